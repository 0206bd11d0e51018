"""Fill a paper-style table (methods x benchmarks) from search runs and evaluate.py runs.

    python search.py -m experiment=paper/scienceqa_7b,paper/scienceqa_7b_sparsegpt,paper/scienceqa_7b_wanda,\
paper/scienceqa_7b_owl,paper/scienceqa_7b_ecoflap seed=0,1,2
    python evaluate.py -m data=mmvet,llava_bench judge=openai model.path=<search run>/pruned_model,...
    python experiments/paper_table.py multirun/search/<date> multirun/evaluate/<date>

Every directory holding a search's summary.json gives its method (EfficientLLaVA, SparseGPT, Wanda, OWL, ECoFLaP,
... from the strategy and the final pruner in .hydra/config.yaml), its benchmark (data.build.name) and held-out
score, and once per model and benchmark the dense score. Every evaluate.py metrics.json gives a score of the model
it evaluated: a search's pruned_model/ counts for that search's method, the search's own model for Dense. Cells
are mean +- std over runs (seeds) with their count; speedups are the searches' (estimated: ideal sparse engine;
measured: this machine, masks on dense kernels). Writes <out>/paper_table.md and paper_table.json, prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

COLUMNS = {"scienceqa": "ScienceQA-IMG", "vizwiz": "VizWiz", "mmvet": "MM-Vet", "llava_bench": "LLaVA-Bench",
           "toy": "Toy"}
METHOD_ORDER = ["Dense", "EfficientLLaVA", "SparseGPT", "Wanda", "Magnitude", "OWL", "ECoFLaP", "Random"]


def _config(run: Path) -> dict:
    path = run / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _get(config: dict, dotted: str, default=None):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def benchmark_of(config: dict) -> str:
    name = _get(config, "data.build.name")
    if name:
        return str(name)
    return "toy" if str(_get(config, "data.build._target_", "")).endswith("build_toy_benchmark") else "unknown"


def method_of(summary: dict, config: dict) -> str:
    """The table's name for a search run: the allocation strategy and the final pruner."""
    strategy = summary.get("strategy", _get(config, "search.strategy", "?"))
    final = str(_get(config, "final.method", "sparsegpt"))
    pruner = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "Magnitude"}.get(final, final)
    if strategy == "evolution":
        label = "EfficientLLaVA"
        extras = []
        if float(_get(config, "search.eta", summary.get("eta", 0.01)) or 0) == 0:
            extras.append("w/o Gen")
        if _get(config, "search.projector.enabled", True) is False:
            extras.append("w/o projector")
        if final != "sparsegpt":
            extras.append(pruner)
        return f"{label} ({', '.join(extras)})" if extras else label
    if strategy == "uniform":
        return pruner
    base = {"owl": "OWL", "ecoflap": "ECoFLaP", "random": "Random"}.get(strategy, strategy)
    return f"{base} ({pruner})"


def find(directories: list[Path], name: str) -> list[Path]:
    out = []
    for directory in directories:
        if (directory / name).is_file():
            out.append(directory)
        out += sorted(p.parent for p in directory.rglob(name) if p.parent != directory)
    return sorted(set(out))


def collect(directories: list[Path]) -> tuple[dict, dict, list[str]]:
    """(scores {(model, target, method, benchmark): [values]}, speed {(model, target, method): {...: [values]}},
    notes)."""
    scores, speed, notes = defaultdict(list), defaultdict(lambda: defaultdict(list)), []
    searches = {}
    for run in find(directories, "summary.json"):
        summary = json.loads((run / "summary.json").read_text())
        if "pruned" not in summary or "dense" not in summary:
            continue
        config = _config(run)
        method, bench = method_of(summary, config), benchmark_of(config)
        model, target = summary["model"], summary["target_sparsity"]
        searches[str(run.resolve())] = (model, target, method)
        scores[(model, target, method, bench)].append(summary["pruned"]["heldout_acc"])
        dense_key = (model, None, "Dense", bench)
        dense = summary["dense"]["heldout_acc"]
        if dense not in scores[dense_key]:  # the same dense model scored by several searches counts once
            scores[dense_key].append(dense)
        s = speed[(model, target, method)]
        s["estimated"].append(summary["speedup"]["estimated"])
        s["measured"].append(summary["speedup"]["measured"])
        s["sparsity"].append(summary["pruned"]["sparsity"])
    for run in find(directories, "metrics.json"):
        metrics = json.loads((run / "metrics.json").read_text())
        if "benchmark" not in metrics or "results" not in metrics:
            continue
        results = metrics["results"]
        value = results.get("score", results.get("acc"))
        if value is None:
            notes.append(f"{run}: {metrics['benchmark']} not scored ({results.get('note', 'no score')})")
            continue
        model_path = Path(metrics["model"])
        origin = searches.get(str(model_path.parent.resolve())) if model_path.name == "pruned_model" else None
        if origin is not None:
            model, target, method = origin
        else:
            model, target, method = metrics["model"], None, "Dense"
        key = (model, target, method, metrics["benchmark"])
        scores[key].append(value)
        if "judge" in results:
            notes.append(f"{metrics['benchmark']} scored by the judge {results['judge']}")
    return scores, speed, sorted(set(notes))


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} ({len(values)})"


def _method_rank(method: str) -> tuple:
    base = method.split(" (")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def table(scores: dict, speed: dict) -> tuple[str, list[dict]]:
    benches = sorted({k[3] for k in scores}, key=lambda b: list(COLUMNS).index(b) if b in COLUMNS else 99)
    models = sorted({k[0] for k in scores if k[2] != "Dense"} or {k[0] for k in scores})
    lines, rows = [], []
    for model in models:
        lines += [f"**{model}**", "", "| method | target sparsity | " + " | ".join(COLUMNS.get(b, b) for b in benches)
                  + " | sparsity | speedup (estimated) | speedup (measured) |",
                  "|---|---|" + "---|" * (len(benches) + 3)]
        entries = [(None, "Dense")] + sorted({(k[1], k[2]) for k in scores if k[0] == model and k[2] != "Dense"},
                                             key=lambda e: (e[0], _method_rank(e[1])))
        for target, method in entries:
            values = {b: scores.get((model, target, method, b), []) for b in benches}
            if not any(values.values()):
                continue
            s = speed.get((model, target, method), {})
            row = {"model": model, "method": method, "target": target,
                   **{b: values[b] for b in benches},
                   **{k: s.get(k, []) for k in ("sparsity", "estimated", "measured")}}
            rows.append(row)
            spd = [f"{statistics.mean(s[k]):.2f}x" if s.get(k) else "-" for k in ("estimated", "measured")]
            sparsity = f"{statistics.mean(s['sparsity']):.3f}" if s.get("sparsity") else "0"
            lines.append(f"| {method} | {'-' if target is None else target} | "
                         + " | ".join(cell(values[b]) for b in benches) + f" | {sparsity} | {spd[0]} | {spd[1]} |")
        lines.append("")
    return "\n".join(lines), rows


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where paper_table.md/.json go (default: the first "
                                                               "directory)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        raise SystemExit(f"not a directory: {missing}; expected search or evaluate.py run directories")
    scores, speed, notes = collect(args.directories)
    if not scores:
        raise SystemExit(f"no summary.json or metrics.json under {[str(d) for d in args.directories]}; expected "
                         "search.py or evaluate.py run directories")
    text, rows = table(scores, speed)
    text += ("\nScores: held-out accuracy (%) for ScienceQA / VizWiz (VQA accuracy) / Toy; judge score for MM-Vet and "
             "LLaVA-Bench. Cells: mean +- std (runs).\n")
    text += "".join(f"- {n}\n" for n in notes)
    out = args.out or args.directories[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_table.md").write_text(text)
    (out / "paper_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'paper_table.md'} and paper_table.json")
    return text


if __name__ == "__main__":
    main()
