"""The accuracy / speedup Pareto front of evaluated candidates: which are on it, pareto.json and pareto.png.

A candidate is on the front when no other candidate has at least its accuracy and at least its speedup with one of
the two strictly larger. Both axes are maximized. The accuracy axis is the search-sample accuracy (every candidate
has one); held-out accuracy is written where it was evaluated.
"""
from __future__ import annotations

from pathlib import Path


def front_flags(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, speedup) points: True where no other point dominates."""
    flags = []
    for i, (a, s) in enumerate(points):
        dominated = any((a2 >= a and s2 >= s and (a2 > a or s2 > s)) for j, (a2, s2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def mark_front(rows: list[dict], acc: str = "search_acc", speed: str = "speedup") -> list[dict]:
    for row, flag in zip(rows, front_flags([(r[acc], r[speed]) for r in rows])):
        row["on_front"] = bool(flag)
    return rows


def plot_front(path: str | Path, series: dict[str, list[dict]], title: str, dense: dict | None = None,
               finals: dict[str, dict] | None = None, acc: str = "search_acc", speed: str = "speedup",
               xlabel: str = "speedup (estimated, ideal sparse engine)", ylabel: str = "accuracy on search samples (%)",
               points: str = "candidates"):
    """Scatter of every candidate per series (strategy), front points ringed and joined; dense and finals marked.

    Written to a temporary file and renamed, so a reader never sees half an image."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (full_name, rows) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        name = full_name if len(full_name) <= 48 else full_name[:45] + "..."
        if not rows:
            continue
        ax.scatter([r[speed] for r in rows], [r[acc] for r in rows], s=14, alpha=0.45, color=colour,
                   label=f"{name} {points} ({len(rows)})")
        front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r[speed])
        if front:
            ax.plot([r[speed] for r in front], [r[acc] for r in front], "-o", color=colour, markersize=7,
                    markerfacecolor="none", markeredgewidth=1.5, label=f"{name} front")
        final = (finals or {}).get(full_name)
        if final and final.get(acc) is not None:
            ax.scatter([final[speed]], [final[acc]], marker="*", s=220, color=colour, edgecolor="black",
                       zorder=5, label=f"{name} final ({final.get('label', 'pruned')})")
    if dense is not None:
        ax.scatter([dense[speed]], [dense[acc]], marker="D", s=60, color="black", zorder=5, label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
