"""Collect a search multirun into one markdown table and one front plot.

    python search.py -m search.target_sparsity=0.3,0.5,0.7 seed=0,1,2
    python experiments/collect_multirun.py multirun/search/<date>     # or several dirs, e.g. one per strategy
    python search.py -m search=evolution,uniform,owl,ecoflap,random    # every strategy in one sweep

Every job directory holding a summary.json becomes a row (its overrides name it); rows that differ only by seed are
also averaged (mean +- std over seeds). Writes <first dir>/results.md and <first dir>/front.png (held-out accuracy of
each final pruned model vs its estimated speedup, one series per setting, the front of each ringed) and prints the
table. `--candidates` also writes candidates.png: every evaluated candidate of every run (search-sample accuracy vs
estimated speedup), one series per setting, on one front.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from efficientllava.search.pareto import mark_front, plot_front

VARYING = ("search.target_sparsity", "seed")  # the axes of a sweep: not part of a series' label


def read_run(job: Path) -> dict | None:
    summary_path = job / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    overrides_path = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
    settings = dict(o.split("=", 1) for o in overrides if "=" in o)
    return {"job": str(job), "overrides": settings, "seed": settings.get("seed", "0"), "summary": summary}


def label_series(runs: list[dict]) -> None:
    """A run's series: its strategy plus those of its overrides that differ between runs (target and seed excepted).

    An override a run does not have is its default and is left out of its label, so runs of several sweeps read as
    `evolution` (the defaults) beside `evolution experiment=n16`.
    """
    keys = sorted({k for r in runs for k in r["overrides"]} - set(VARYING))
    differing = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]
    for r in runs:
        label = " ".join(f"{k}={r['overrides'][k]}" for k in differing if k in r["overrides"])
        r["series"] = f"{r['summary']['strategy']} {label}".strip()


def collect(directories: list[Path]) -> list[dict]:
    runs = []
    for directory in directories:
        jobs = [directory] + sorted(p for p in directory.rglob("*") if p.is_dir())
        for job in jobs:
            run = read_run(job)
            if run is not None:
                runs.append(run)
    if not runs:
        raise SystemExit(f"no summary.json under {[str(d) for d in directories]}; expected search run directories")
    label_series(runs)
    return runs


def row(run: dict) -> dict:
    s = run["summary"]
    return {
        "series": run["series"], "target": s["target_sparsity"], "seed": run["seed"],
        "dense": s["dense"]["heldout_acc"], "pruned": s["pruned"]["heldout_acc"],
        "search_acc": s["pruned"]["search_acc"], "sparsity": s["pruned"]["sparsity"],
        "measured": s["speedup"]["measured"], "estimated": s["speedup"]["estimated"],
        "seconds": s["search_seconds"], "candidates": s["candidates_evaluated"],
        "per_candidate": s["seconds_per_candidate"], "job": Path(run["job"]).name,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| series | target | seed | dense held-out % | pruned held-out % | pruned search % | sparsity | "
             "speedup measured | speedup estimated | search s | candidates | s/candidate | job |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["series"], r["target"], str(r["seed"]))):
        lines.append(f"| {r['series']} | {r['target']} | {r['seed']} | {r['dense']:.2f} | {r['pruned']:.2f} | "
                     f"{r['search_acc']:.2f} | {r['sparsity']:.4f} | {r['measured']:.2f}x | {r['estimated']:.2f}x | "
                     f"{r['seconds']:.0f} | {r['candidates']} | {r['per_candidate']:.3f} | {r['job']} |")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["series"], r["target"])].append(r)
    lines += ["", "Mean +- std over seeds:", "",
              "| series | target | seeds | pruned held-out % | dense held-out % | speedup estimated |",
              "|---|---|---|---|---|---|"]
    for (series, target), rs in sorted(groups.items()):
        pruned = [r["pruned"] for r in rs]
        std = statistics.stdev(pruned) if len(pruned) > 1 else 0.0
        lines.append(f"| {series} | {target} | {len(rs)} | {statistics.mean(pruned):.2f} +- {std:.2f} | "
                     f"{statistics.mean(r['dense'] for r in rs):.2f} | "
                     f"{statistics.mean(r['estimated'] for r in rs):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where results.md and front.png go (default: the "
                                                               "first directory)")
    parser.add_argument("--candidates", action="store_true", help="also plot every candidate (candidates.png)")
    args = parser.parse_args(argv)
    runs = collect(args.directories)
    rows = [row(r) for r in runs]
    out = args.out or args.directories[0]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "results.md").write_text(table)
    series = defaultdict(list)
    for r in rows:
        series[r["series"]].append({"heldout_acc": r["pruned"], "speedup": r["estimated"]})
    for points in series.values():
        mark_front(points, acc="heldout_acc")
    dense = {"heldout_acc": statistics.mean(r["dense"] for r in rows), "speedup": 1.0}
    plot_front(out / "front.png", dict(series), title=f"final pruned models ({len(rows)} runs)", dense=dense,
               acc="heldout_acc", ylabel="held-out accuracy (%)", points="runs")
    if args.candidates:
        plot_candidates(runs, out / "candidates.png")
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'front.png'}" + (" and candidates.png" if args.candidates else ""))


def plot_candidates(runs: list[dict], path: Path) -> None:
    series = defaultdict(list)
    for run in runs:
        pareto = Path(run["job"]) / "pareto.json"
        if pareto.is_file():
            series[run["series"]] += json.loads(pareto.read_text())["candidates"]
    for rows in series.values():
        mark_front(rows)
    plot_front(path, dict(series), title=f"every candidate ({sum(map(len, series.values()))}, {len(runs)} runs)")


if __name__ == "__main__":
    main()
