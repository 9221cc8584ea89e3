"""The report's statistics: which rows are compared, paired worst-group differences and their Student-t intervals."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .results import StudyResult


CONFIDENCE = 0.95
FEW_SEEDS = 5  # under this many paired seeds the caption warns that the interval is rough
CONTRAST_COLUMNS = ["dataset", "comparison", "paired seeds", "Worst diff (pp)", "95% CI low", "95% CI high"]


def t_interval(diffs, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t confidence interval (n - 1 degrees of freedom)."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def comparisons(results: list[StudyResult]) -> list[tuple[StudyResult, StudyResult]]:
    """(a, b) pairs for a − b: the proposed method minus every other, then every other method minus the control."""
    pairs = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        rows = [r for r in results if r.dataset == dataset]
        pairs += [(p, o) for p in rows if p.cls.card.proposed for o in rows if o is not p]
        pairs += [(o, c) for c in rows if c.cls.card.control for o in rows
                  if o is not c and not o.cls.card.proposed and not o.cls.card.control]
    return pairs


def _r(v: float) -> float:
    return round(v, 1) + 0.0  # + 0.0: no "-0.0" in a table


def paired_diffs(a: StudyResult, b: StudyResult) -> list[float]:
    """Test worst-group differences a − b (pp), paired by training seed over the seeds both rows finished."""
    mine = {t.seed: t.test.wga for t in a.runs()}
    theirs = {t.seed: t.test.wga for t in b.runs()}
    return [100 * (mine[s] - theirs[s]) for s in sorted(set(mine) & set(theirs))]


def contrasts(results: list[StudyResult]) -> pd.DataFrame:
    """Test worst-group differences (pp), paired by training seed over the seeds both rows finished."""
    rows = []
    for a, b in comparisons(results):
        diffs = paired_diffs(a, b)
        if len(diffs) < 2:
            continue
        mean, lo, hi = t_interval(diffs)
        rows.append({"dataset": a.dataset, "comparison": f"{a.label} − {b.label}", "paired seeds": len(diffs),
                     "Worst diff (pp)": _r(mean), "95% CI low": _r(lo), "95% CI high": _r(hi)})
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def decided(lo: float, hi: float) -> str:
    """What a confidence interval of a difference says: 'better' (above 0), 'worse' (below 0) or 'undecided'."""
    return "better" if lo > 0 else "worse" if hi < 0 else "undecided"


def verdict(a: StudyResult, b: StudyResult) -> str:
    """'better (+12.3)', 'worse (−4.0)' or 'undecided (+1.2)': where the 95% interval of the paired worst-group
    difference a − b lies; 'n/a' under 2 paired seeds."""
    diffs = paired_diffs(a, b)
    if len(diffs) < 2:
        return "n/a"
    mean, lo, hi = t_interval(diffs)
    return f"{decided(lo, hi)} ({_r(mean):+.1f})".replace("-", "−")


def contrast_caption(diffs: pd.DataFrame) -> str:
    few = (f" Fewer than {FEW_SEEDS} paired seeds in some rows: the interval rests on very few differences."
           if len(diffs) and diffs["paired seeds"].min() < FEW_SEEDS else "")
    return ("Mean test worst-group difference of each comparison (first method − second, percentage points) over the "
            f"seeds both finished, paired by training seed, with its {CONFIDENCE:.0%} Student-t interval.{few}")
