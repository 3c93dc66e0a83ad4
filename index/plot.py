"""One PNG per build: draft agreement per skipped layer per domain, and each domain's measured speedup
(with its interval, own config or inherited, and the general config's speedup as a line).

Pure function of the search results -> PNG bytes (written into the artefact by the build). Uses
matplotlib's object API with the Agg canvas, so it needs no display and touches no global pyplot state.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from index.artefact import GeneralEntry
from index.search import DomainResult

PLOT_FILE = "search.png"


def render_plot(results: Mapping[str, DomainResult], title: str = "", general: GeneralEntry | None = None) -> bytes:
    """`general` (when the build measured one) adds its speedup as a line, and each domain's bar gets the
    interval of its confirmation measurement and says whether it kept its own config or inherited."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted(results)
    fig = Figure(figsize=(12, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})

    for name in names:
        prof = results[name].layer_agreement
        if prof:
            ax1.plot(range(len(prof)), prof, marker="o", markersize=3, linewidth=1.2, label=name)
    ax1.set_xlabel("skipped layer (attention + MLP)")
    ax1.set_ylabel("draft agreement with greedy output")
    ax1.set_ylim(0.0, 1.02)
    ax1.set_title("Acceptance when skipping one layer")
    ax1.grid(alpha=0.3)
    if any(results[n].layer_agreement for n in names):
        ax1.legend(fontsize=8, loc="lower right")

    speed = [results[n].speedup for n in names]

    def color(r: DomainResult) -> str:
        if not r.config.enabled:
            return "tab:gray"
        return "tab:blue" if r.choice is not None and r.choice.source == "general" else "tab:green"

    colors = [color(results[n]) for n in names]
    choices = [results[n].choice for n in names]
    err = None
    if all(c is not None for c in choices):
        err = [[max(c.speedup.value - c.speedup.low, 0.0) for c in choices], [max(c.speedup.high - c.speedup.value, 0.0) for c in choices]]
    bars = ax2.bar(names, speed, color=colors, yerr=err, capsize=3)
    ax2.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    if general is not None:
        ax2.axhline(general.speedup.value, color="tab:blue", linewidth=0.8, linestyle=":", label=f"general: {general.name} (all domains)")
        ax2.legend(fontsize=7, loc="lower right")
    for b, n in zip(bars, names):
        r = results[n]
        label = f"{r.speedup:.2f}x" if r.config.enabled else "plain"
        if r.choice is not None:
            label += f"\n{r.choice.source}"
        ax2.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax2.set_ylabel("tokens/s vs plain decoding")
    ax2.set_title("Measured speedup per domain")
    tops = [*speed, *(c.speedup.high for c in choices if c is not None)]
    ax2.set_ylim(0.0, max([1.2, *tops]) * 1.2)
    ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
