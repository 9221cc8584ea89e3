"""The report in each format — markdown, CSV (one tidy table, no text cell a spreadsheet would run), LaTeX (booktabs,
every cell escaped), HTML (one offline page with the figures) — all rendered from study.tables."""
from __future__ import annotations

import html
import re

import pandas as pd

from .figures import benchmark_figure, figures
from .statistics import contrast_caption, contrasts
from .tables import (BENCHMARK_CAPTION, anchor_caption, anchor_table, benchmark_summary, caption, datasets_of,
                     sections, shown, tidy)


FORMATS = ("markdown", "csv", "latex", "html")


def render_markdown(exp, results, avg: str) -> str:
    out, several = f"{caption(exp, results, avg)}\n", len(datasets_of(results)) > 1
    for dataset, rows in sections(results):
        if several:
            out += f"\n#### {dataset}\n"
        out += f"\n{shown(exp, rows, avg).to_markdown(index=False, disable_numparse=True)}\n"  # "58.0", not "58"
        diffs = contrasts(rows)
        if len(diffs):
            out += f"\n{contrast_caption(diffs)}\n\n{diffs.to_markdown(index=False, floatfmt='.1f')}\n"
        anchors = anchor_table(dataset, rows)
        if anchors is not None:
            out += f"\n{anchor_caption(dataset)}\n\n{anchors.to_markdown(index=False, disable_numparse=True)}\n"
    bench = benchmark_summary(results)
    if len(bench):
        table = bench.to_markdown(index=False, disable_numparse=True)
        out += f"\n#### across benchmarks\n\n{BENCHMARK_CAPTION}\n\n{table}\n"
    return out


_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell that starts with one as a formula


def _inert(value):
    """A text cell a spreadsheet shows as text (OWASP's CSV injection rule: a leading quote); numbers unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


def _csv(table: pd.DataFrame) -> str:
    """CSV that pandas.read_csv reads as numbers, not text, and in which no text cell is a formula."""
    return table.map(_inert).to_csv(index=False)


def render_csv(exp, results, avg: str) -> str:
    """The tidy table as CSV."""
    return _csv(tidy(exp, results, avg))


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"±": r"$\pm$", "−": "$-$", "†": r"\dag{}", "×": r"$\times$", "—": "---", "–": "--", "…": r"\dots{}",
                "≥": r"$\geq$", "≤": r"$\leq$", "λ": r"$\lambda$", "ε": r"$\varepsilon$", "ρ": r"$\rho$",
                "η": r"$\eta$", "·": r"$\cdot$"}


def tex_escape(text: str) -> str:
    """Text as LaTeX typesets it: its special characters escaped, the Unicode the report uses as math."""
    return "".join(_TEX_SPECIAL.get(c) or _TEX_UNICODE.get(c, c) for c in str(text))


def _latex_table(df: pd.DataFrame, text: str, label: str) -> str:
    """A booktabs table scaled to the text width (\\usepackage{booktabs,graphicx}), every cell escaped."""
    body = df.map(tex_escape).rename(columns=tex_escape).to_latex(index=False, escape=False)
    label = re.sub(r"[^A-Za-z0-9:._-]", "-", label)
    return (f"\\begin{{table}}\n\\centering\n\\caption{{{tex_escape(text)}}}\n\\label{{{label}}}\n"
            f"\\resizebox{{\\linewidth}}{{!}}{{%\n{body}}}\n\\end{{table}}\n")


def render_latex(exp, results, avg: str) -> str:
    out, several = "", len(datasets_of(results)) > 1
    for dataset, rows in sections(results):
        table = shown(exp, rows, avg).rename(columns={"trials (complete/pruned/failed)": "trials (c/p/f)"})
        text = caption(exp, results, avg) + (f" Dataset {dataset}." if several else "")
        out += ("\n" if out else "") + _latex_table(table, text, f"tab:{exp.name}-{dataset}" if several
                                                     else f"tab:{exp.name}")
        diffs = contrasts(rows)
        if len(diffs):
            cells = diffs.astype(object).map(lambda v: f"{v:.1f}" if isinstance(v, float) else v)
            out += "\n" + _latex_table(cells, contrast_caption(diffs), f"tab:{exp.name}-{dataset}-ci" if several
                                       else f"tab:{exp.name}-ci")
        anchors = anchor_table(dataset, rows)
        if anchors is not None:
            out += "\n" + _latex_table(anchors, anchor_caption(dataset), f"tab:{exp.name}-{dataset}-published")
    bench = benchmark_summary(results)
    if len(bench):
        out += "\n" + _latex_table(bench, BENCHMARK_CAPTION, f"tab:{exp.name}-benchmarks")
    return out


def _html_parts(exp, results, avg: str, with_js: bool) -> list[str]:
    parts, several = [f"<h1>Experiment {html.escape(exp.name)}</h1>",
                      f"<p>{html.escape(caption(exp, results, avg))}</p>"], len(datasets_of(results)) > 1
    for dataset, rows in sections(results):
        if several:
            parts.append(f"<h2>{html.escape(dataset)}</h2>")
        parts.append(shown(exp, rows, avg).to_html(index=False, border=0, classes="table"))
        diffs = contrasts(rows)
        if len(diffs):
            parts += [f"<p>{html.escape(contrast_caption(diffs))}</p>", diffs.to_html(index=False, border=0)]
        anchors = anchor_table(dataset, rows)
        if anchors is not None:
            parts += [f"<p>{html.escape(anchor_caption(dataset))}</p>", anchors.to_html(index=False, border=0)]
    figs = list(figures(results, avg, exp.selection).values())
    bench = benchmark_summary(results)
    if len(bench):
        parts += ["<h2>across benchmarks</h2>", f"<p>{html.escape(BENCHMARK_CAPTION)}</p>",
                  bench.to_html(index=False, border=0)]
        figs.insert(0, benchmark_figure(results))
    for i, fig in enumerate(figs):  # plotly.js inlined once: the file works offline
        parts.append(fig.to_html(full_html=False, include_plotlyjs=with_js and i == 0, default_width="100%"))
    return parts


def _page(title: str, parts: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{padding:2px 10px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)} report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def render_html(exp, results, avg: str) -> str:
    return _page(exp.name, _html_parts(exp, results, avg, with_js=True))


def render(fmt: str, reports: list[tuple], avg: str) -> str:
    """The report of one or several experiments [(exp, results)], side by side: one after another (CSV: one tidy
    table, its `experiment` column telling them apart; HTML: one page)."""
    if fmt == "csv":
        return _csv(pd.concat([tidy(exp, results, avg) for exp, results in reports]))
    if fmt == "html":
        return _page(", ".join(exp.name for exp, _ in reports),
                     [part for i, (exp, results) in enumerate(reports)
                      for part in _html_parts(exp, results, avg, with_js=i == 0)])
    return "\n".join(RENDER[fmt](exp, results, avg) for exp, results in reports)


SUFFIXES = {".md": "markdown", ".csv": "csv", ".tex": "latex", ".html": "html", ".htm": "html"}
RENDER = {"markdown": render_markdown, "csv": render_csv, "latex": render_latex, "html": render_html}
