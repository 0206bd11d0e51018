"""What the final rerank chose, and what it would have chosen with fewer tries.

    python experiments/rerank_table.py outputs/rr_0.6_0 [more run dirs ...]

For each finished search.py run (its summary.json) with a final rerank (`final_rerank` > 1, weight-sparsity plans):
the held-out accuracy of the search's best plan pruned for real (a rerank of 1), of the plan a rerank of 4 and of the
run's own rerank would pick (the best final fitness among the first m tries; only the search samples decide), which
try was chosen, and the range of held-out accuracy over the tries evaluated on it (`heldout_top` of them; run with
heldout_top >= final_rerank to see all). Then the mean and standard deviation over the runs of each target. Prints a
markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def pick(tried: list[dict], m: int) -> dict:
    """The try a rerank of m would keep: the best final fitness among the first m (ties: the earlier)."""
    return max(tried[:m], key=lambda t: t["fitness"])


def run_row(run: Path, m: int = 4) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{run}: summary.json is missing; expected the directory of a finished search.py run")
    summary = json.loads(path.read_text())
    rerank = summary.get("final_rerank")
    if not rerank:
        raise SystemExit(f"{run}: summary.json has no final rerank; expected a run with final_rerank > 1 "
                         "(weight-sparsity plans)")
    tried = rerank["tried"]
    ids = [t["id"] for t in tried]
    held = [t["heldout_acc"] for t in tried if "heldout_acc" in t]
    return {"run": str(run), "target": summary["target_sparsity"], "tries": len(tried),
            "first": tried[0].get("heldout_acc"),
            f"rerank_{m}": pick(tried, m).get("heldout_acc") if len(tried) >= m else None,
            "chosen_position": ids.index(rerank["chosen"]) + 1, "final": summary["pruned"]["heldout_acc"],
            "range": (min(held), max(held)) if held else None, "evaluated": len(held)}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: list[dict], m: int = 4) -> str:
    lines = [f"| run | target | search's best (rerank 1) | rerank {m} | run's rerank (tries) | chosen try | held-out "
             "range of the tries (evaluated) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        span = "-" if r["range"] is None else f"{r['range'][0]:.2f}-{r['range'][1]:.2f}"
        lines.append(f"| {r['run']} | {r['target']} | {_fmt(r['first'])} | {_fmt(r[f'rerank_{m}'])} | "
                     f"{_fmt(r['final'])} ({r['tries']}) | {r['chosen_position']} | {span} ({r['evaluated']}) |")
    by_target = defaultdict(list)
    for r in rows:
        by_target[r["target"]].append(r)
    for target, group in sorted(by_target.items()):
        lines.append(f"| mean ± std, {len(group)} run(s) | {target} | {_mean(r['first'] for r in group)} | "
                     f"{_mean(r[f'rerank_{m}'] for r in group)} | {_mean(r['final'] for r in group)} | | |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="search.py run directories")
    parser.add_argument("--m", type=int, default=4, help="also show what a rerank of this many tries would keep")
    args = parser.parse_args(argv)
    if args.m < 1:
        raise SystemExit(f"--m is {args.m}; expected at least 1")
    out = table([run_row(run, args.m) for run in args.runs], args.m)
    print(out)
    return out


if __name__ == "__main__":
    main()
