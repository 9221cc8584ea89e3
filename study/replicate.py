"""`python -m study replicate`: the seed phase — the top-k searched configurations re-run with more training seeds.

For every study whose search is finished, the k best searched trials (by the selection metric, the report's rule)
are enqueued in the study's seed-phase sibling (`<experiment>/<dataset>/<method>/seeds`) with training seeds
seed+1 ... seed+S-1 (the searched run, seed `seed`, counts as the first of S). Any worker runs them, never pruned and
outside the search budget; the report then selects the configuration with the best mean over its seeds. The same
seeds for every method, so runs pair by seed across methods. Running it again adds only what is missing (a seed
that failed stays failed: the report shows it).
"""
from __future__ import annotations

from .records import plan, ranked
from .results import collect, trial_counts

TOP_K = 3   # configurations carried into the seed phase
SEEDS = 5   # seeds per configuration, the searched run counting as one (BalancingGroups ranks by 5)


def replicate(storage, experiment: str, seeds: int = SEEDS, top_k: int = TOP_K) -> dict[str, list[tuple[int, int]]]:
    """Enqueue the missing seed-phase runs. Returns {study: [(rank, seed) enqueued]}."""
    if seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (the searched run counts as one), got {seeds}")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    exp, results = collect(storage, experiment)
    unfinished = []
    for r in results:  # the ranking must be final before it is replicated
        c = trial_counts(r.study)
        if c["used"] < exp.trials or c["running"] or c["waiting"]:
            unfinished.append(f"{r.name} ({c['used']}/{exp.trials} trials, {c['running']} running, "
                              f"{c['waiting']} waiting)")
        elif r.best is None:
            unfinished.append(f"{r.name} (no finished trial)")
        elif r.seeds_study is None:
            unfinished.append(f"{r.name} (no seed-phase study: created by this version's init)")
    if unfinished:
        raise ValueError(f"search not finished, nothing enqueued: {'; '.join(unfinished)}")
    out = {}
    for r in results:
        study = r.seeds_study
        have = {(c.searched.number, t.seed) for c in r.configs for t in c.reruns}
        new = []
        for rank, t in enumerate(ranked(r.search)[:top_k], start=1):
            for seed in range(exp.run.seed + 1, exp.run.seed + seeds):
                if (t.number, seed) not in have:
                    study.enqueue_trial(t.params, user_attrs=plan(seed, config=t.number, rank=rank))
                    new.append((rank, seed))
        out[r.name] = new
    return out
