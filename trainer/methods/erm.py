"""Empirical risk minimisation: mean cross-entropy (the base class's loss)."""
from .base import Method


class ERM(Method):
    label, order, control, reference = "ERM", 0, True, True
    family, cites = "baseline", "Vapnik, 1992"
