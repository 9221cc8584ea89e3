"""The report's plotly figures, drawn from the StudyResults of `study.results.collect`."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from optuna.trial import TrialState

from trainer.methods import METHODS

from .results import AVG

# One colour per registered method, in the registry's order (ERM grey, GroupDRO blue, Ours red, ...): a method keeps
# its colour in every figure and every report, whatever else the experiment holds.
PALETTE = ("#7f7f7f", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")


def color(method: str) -> str:
    return PALETTE[list(METHODS).index(method) % len(PALETTE)] if method in METHODS else PALETTE[0]


def _name(r, results) -> str:
    """'Ours' with one dataset, 'waterbirds/Ours' with several."""
    return r.label if len({x.dataset for x in results}) == 1 else f"{r.dataset}/{r.label}"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (Avg, Worst), both maximised, sorted by Avg."""
    front, best_worst = [], float("-inf")
    for avg, worst in sorted(points, key=lambda p: (-p[0], -p[1])):
        if worst > best_worst:
            front.append((avg, worst))
            best_worst = worst
    return sorted(front)


def _trial_axis(fig: go.Figure, results) -> go.Figure:
    """Trial numbers are integers: whole-number ticks, at most about ten."""
    last = max((t.number for r in results for t in r.search), default=0)
    return fig.update_xaxes(tickformat="d", tick0=0, dtick=max(1, -(-last // 10)), rangemode="tozero")


def history(results, objective: str) -> go.Figure:
    """Completed trials (filled) with the best so far, and pruned ones (open) at their last reported value."""
    fig = go.Figure()
    for r in results:
        done = sorted((t for t in r.search if t.state == TrialState.COMPLETE), key=lambda t: t.number)
        pruned = [t for t in r.search if t.state == TrialState.PRUNED and t.intermediate_values]
        c, name = color(r.method), _name(r, results)
        fig.add_scatter(x=[t.number for t in done], y=[t.value for t in done], mode="markers", name=name,
                        legendgroup=name, marker_color=c)
        fig.add_scatter(x=[t.number for t in pruned],
                        y=[t.intermediate_values[max(t.intermediate_values)] for t in pruned], mode="markers",
                        name=f"{name} pruned", legendgroup=name, marker=dict(color=c, symbol="circle-open"),
                        hovertext=[f"trial {t.number} pruned at epoch {max(t.intermediate_values)}" for t in pruned])
        best, running = [], float("-inf")
        for t in done:
            running = max(running, t.value)
            best.append(running)
        fig.add_scatter(x=[t.number for t in done], y=best, mode="lines", line_shape="hv", name=f"{name} best",
                        legendgroup=name, line_color=c, showlegend=False)
    return _trial_axis(fig.update_layout(xaxis_title="trial number", yaxis_title=objective), results)


def avg_vs_worst(results, avg_key: str) -> go.Figure:
    fig = go.Figure()
    for r in results:
        done = [t.run for t in r.search if t.run]
        pts = [(100 * t.test.avg(avg_key), 100 * t.test.wga) for t in done]
        c, name = color(r.method), _name(r, results)
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=name, legendgroup=name,
                        marker_color=c, text=[f"trial {t.number}" for t in done])
        front = pareto_front(pts)
        fig.add_scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", line_dash="dot",
                        line_color=c, name=f"{name} Pareto front", legendgroup=name, showlegend=False)
    return fig.update_layout(xaxis_title="test Avg (%)", yaxis_title="test Worst (%)")


def group_accuracy(results) -> go.Figure:
    fig = go.Figure()
    for r in results:
        if r.best is None:
            continue
        groups = r.best.test.groups if r.best.test else ()
        fig.add_bar(x=[f"{g.name} (n={g.count})" for g in groups], y=[100 * g.acc for g in groups],
                    name=_name(r, results), marker_color=color(r.method))
    return fig.update_layout(barmode="group", xaxis_title="test group (label y, spurious attribute a)",
                             yaxis_title="accuracy of the best trial (%)")


def val_curves(results, objective: str) -> go.Figure:
    fig = go.Figure()
    for r in results:
        c, name, first = color(r.method), _name(r, results), True
        for t in r.search:
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not t.intermediate_values:
                continue
            steps = sorted(t.intermediate_values)
            pruned = t.state == TrialState.PRUNED
            fig.add_scatter(x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines",
                            line=dict(color=c, dash="dot" if pruned else "solid", width=1), opacity=0.7,
                            name=name, legendgroup=name, showlegend=first,
                            hovertext=f"{name} trial {t.number} {'pruned' if pruned else 'complete'}")
            first = False
    return fig.update_layout(xaxis_title="epoch", yaxis_title=f"{objective} — dotted: pruned").update_xaxes(
        tickformat="d")


def benchmark_figure(results) -> go.Figure:
    """Test worst-group accuracy of every method on every benchmark: mean over its seeds, bars ± 1 std."""
    fig = go.Figure()
    for method in dict.fromkeys(r.method for r in results):
        rows = [r for r in results if r.method == method and r.runs()]
        if not rows:
            continue
        values = [100 * np.array([t.test.wga for t in r.runs()]) for r in rows]
        fig.add_bar(x=[r.dataset for r in rows], y=[v.mean() for v in values], name=rows[0].label,
                    marker_color=color(method),
                    error_y=dict(type="data", array=[v.std(ddof=1) if len(v) > 1 else 0 for v in values]),
                    hovertext=[f"{len(v)} seeds" for v in values])
    return fig.update_layout(barmode="group", xaxis_title="benchmark", yaxis_title="test worst-group accuracy (%)",
                             title="Worst-group accuracy across benchmarks (mean ± std over seeds)",
                             template="plotly_white", height=420)


def lambda_share(results) -> go.Figure | None:
    """Where Ours' constraint mass goes, per epoch of its best trial: top, the share of the multipliers' mass held by
    each training group; bottom, the enrichment of that mass on bias-conflicting samples (the paper's hypothesis:
    > 1) and the share of updated multipliers at the cap and at zero (saturation)."""
    fig, any_data = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                                  specs=[[{}], [{"secondary_y": True}]]), False
    for r in results:
        series = r.best.diagnostics if r.best else {}
        shares = series.get("lambda_share") or []
        epochs = [e for e, s in enumerate(shares, start=1) if s]
        if not epochs:
            continue
        any_data, name = True, _name(r, results)
        names = {g.group: g.name for g in r.best.test.groups} if r.best and r.best.test else {}
        for g in range(len(shares[epochs[0] - 1])):
            fig.add_scatter(x=epochs, y=[100 * shares[e - 1][g] for e in epochs], stackgroup=r.name, mode="lines",
                            name=f"{name} {names.get(g, f'group {g}')}", row=1, col=1)
        for key, label, dash, secondary in (("lambda_enrichment", "λ enrichment on bias-conflicting", "solid", False),
                                            ("at_cap_frac", "share at λ_max", "dot", True),
                                            ("at_zero_frac", "share at 0", "dash", True)):
            values = series.get(key) or []
            points = [(e, v) for e, v in enumerate(values, start=1) if v is not None]
            if points:
                x, y = zip(*points)
                fig.add_scatter(x=x, y=[100 * v for v in y] if secondary else y, mode="lines+markers",
                                line=dict(dash=dash), name=f"{name} {label}", row=2, col=1, secondary_y=secondary)
    if not any_data:
        return None
    fig.update_yaxes(title_text="share of total λ (%)", row=1, col=1)
    fig.update_yaxes(title_text="enrichment (×)", row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="multipliers (%)", row=2, col=1, secondary_y=True)
    fig.update_xaxes(tickformat="d")
    return fig.update_xaxes(title_text="epoch", row=2, col=1)


def collapse(results) -> go.Figure | None:
    """Fitting or flattening, per epoch of the best trial of each method that logs it (Ours): the mean norm of the
    penultimate features on val in eval mode, the share of val samples in the most predicted class, and the
    training accuracy of the samples the constraint acts on. A model that collapsed has features near 0 and predicts
    one class (share 100%); one that fits its constrained samples classifies them right."""
    fig, any_data = make_subplots(specs=[[{"secondary_y": True}]]), False
    for r in results:
        series = r.best.diagnostics if r.best else {}
        for key, label, secondary in (("val_feature_norm", "feature norm", False),
                                      ("val_top_class_share", "most predicted class (%)", True),
                                      ("active_accuracy", "constrained samples' train accuracy (%)", True)):
            points = [(e, v) for e, v in enumerate(series.get(key) or [], start=1) if v is not None]
            if points:
                any_data = True
                x, y = zip(*points)
                fig.add_scatter(x=x, y=[100 * v for v in y] if secondary else y, mode="lines+markers",
                                line=dict(dash="dot" if secondary else "solid"),
                                name=f"{_name(r, results)} {label}", secondary_y=secondary)
    if not any_data:
        return None
    fig.update_yaxes(title_text="mean ||h|| on val", secondary_y=False)
    fig.update_yaxes(title_text="share / accuracy (%)", secondary_y=True, range=[0, 101])
    return fig.update_xaxes(title_text="epoch", tickformat="d")


def figures(results, avg: str = "train_weighted", objective: str = "val_wga") -> dict[str, go.Figure]:
    """{id: figure}; the id names the figure in optuna-dashboard (a rerun replaces it). `objective`: the
    selection metric's name, as the studies and the dashboard call it."""
    out = {
        "history": (f"Optimization history: {objective} per trial, best so far, pruned trials open",
                    history(results, objective)),
        "avg-vs-worst": ("Test Avg vs Worst of every finished trial, with each method's Pareto front",
                         avg_vs_worst(results, AVG[avg][0])),
        "groups": ("Per-group test accuracy of each method's best trial", group_accuracy(results)),
        "val-curves": (f"{objective} per epoch of every trial (pruned trials dotted)", val_curves(results, objective)),
        "lambda-share": ("Lambda share: where Ours' constraint mass goes — per training group, enrichment on "
                         "bias-conflicting samples, saturation",
                         lambda_share(results)),
        "collapse": ("Fitting or flattening: Ours' penultimate-feature norm, most predicted class and its constrained "
                     "samples' accuracy per epoch (a collapsed model: features near 0, one class)", collapse(results)),
    }
    return {k: fig.update_layout(title=title, template="plotly_white", height=640 if k == "lambda-share" else 420)
            for k, (title, fig) in out.items() if fig is not None}
