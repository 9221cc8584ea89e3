"""Published Waterbirds numbers (ResNet-50, test %, Avg weighted by training-group proportions), printed beside
the measured rows of Waterbirds and of its bundled stand-in, never mixed into them: other data, other models."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    method: str   # the report's row label of the method
    avg: str      # as published (their precision kept)
    worst: str
    source: str


WATERBIRDS = (
    Anchor("ERM", "97.3", "60.0", "the paper's Waterbirds table"),
    Anchor("DRO", "93.2", "86.0", "the paper's Waterbirds table"),
    Anchor("Ours", "91.94", "84.58", "the paper's Waterbirds table"),
    Anchor("ERM", "97.3", "72.6", "Liu et al. 2021 (JTT paper), early stopping on val worst-group"),
    Anchor("DRO", "93.5", "91.4", "Sagawa et al. 2020 (GroupDRO), strong L2"),
    Anchor("JTT", "93.3", "86.7", "Liu et al. 2021 (JTT)"),
    Anchor("DFR", "94.2", "92.9", "Kirichenko et al. 2023 (DFR, val-trained last layer)"),
    Anchor("LfF", "91.2", "78.0", "Nam et al. 2020, as rerun in Liu et al. 2021"),
)

# dataset -> (what the anchors are, anchors); texdigits is Waterbirds-shaped, so Waterbirds' numbers orient it
ANCHORS = {
    "waterbirds": ("Waterbirds, ResNet-50", WATERBIRDS),
    "texdigits": ("Waterbirds, ResNet-50 — another dataset and model: for orientation only", WATERBIRDS),
}
