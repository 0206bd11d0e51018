"""How close the search's latency table comes to end-to-end measurements: predicted vs measured prefill speedup of
random plans of the search space, on this device.

    python experiments/latency_accuracy.py                                        # search.py's default space (sdpa)
    python experiments/latency_accuracy.py experiment=speed_toy                   # the speed experiment's (eager)
    python experiments/latency_accuracy.py --plans 24 model.attn_implementation=eager

Arguments after the options are `search.py` overrides. The script prepares a search as `search.py` does (the model,
the N search samples, structure importance, the latency table measured and calibrated on this device), then draws
`--plans` random plans from the space without the latency budget (structure and token genes uniform over their
choices, so the plans span the whole speed range), plus the budget's own plans when a budget is set (random plans
repaired onto it, as the search's candidates are). Each plan is built for real (a shrunk copy with its visual-token
pruning) and timed against the dense model, interleaved (`speed_repeats` rounds, median), as the search measures its
front and final model. Prints one row per plan, then the mean and the spread of measured / predicted, split by plans
with and without visual-token pruning, and, with a budget, how many of the plans the table places on the budget meet
it measured. Writes every row to <out>/latency_accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from efficientllava.markdown import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def describe(space, genome) -> tuple[str, str]:
    if not space.structure:
        return "-", describe_tokens(space, genome)
    ratios = space.structure_ratios(genome)
    mlp = "/".join(f"{ratios.get(p, {}).get('mlp', 0.0):g}" for p in space.blocks)
    attn = "/".join(f"{ratios.get(p, {}).get('attn', 0.0):g}" for p in space.blocks)
    return f"mlp {mlp}, heads {attn}", describe_tokens(space, genome)


def describe_tokens(space, genome) -> str:
    tokens = space.token_setting(genome)
    return f"K={tokens['layer']} R={tokens['keep']:g}" if tokens else "-"


def spread(ratios: list[float]) -> str:
    if not ratios:
        return "no plans"
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    return (f"{len(ratios)} plans, measured / predicted {statistics.mean(ratios):.3f} +- {sd:.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=16, help="random plans over the whole space (no budget)")
    parser.add_argument("--budget-plans", type=int, default=8, help="random plans repaired onto the budget, if any")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("overrides", nargs="*", help="search.py overrides, e.g. experiment=speed_toy")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir

    import efficientllava  # noqa: F401  (config resolvers)
    from efficientllava.search.loop import SearchRun
    from efficientllava.speed import scoring_speedup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = args.out or Path(tempfile.mkdtemp(prefix="latency_accuracy-"))
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=["logger=none", "n_heldout=64", *args.overrides])
    run = SearchRun(cfg, out / "run")
    run.prepare()
    accel = run.accel
    if accel is None:
        raise SystemExit("the configured search has neither structure nor visual-token pruning: no latency table to "
                         "check; expected search.structure.enabled or search.tokens.enabled true")
    run.reference()
    accel.release()
    space, repeats = accel.space, int(cfg.speed_repeats)
    rng = np.random.default_rng(args.seed)
    budget = space.max_seconds
    plans = []
    space.max_seconds = None  # random plans over the whole space, not repaired onto the budget
    plans += [("random", space.random(rng)) for _ in range(args.plans)]
    space.max_seconds = budget
    if budget is not None:
        plans += [("on budget", space.random(rng)) for _ in range(args.budget_plans)]
    rows, records, start = [], [], time.perf_counter()
    for i, (kind, genome) in enumerate(plans):
        twin = accel.build(genome, space, weights=False)
        measured = scoring_speedup(run.model, twin, run.samples, repeats=repeats)
        del twin
        predicted = space.predicted_speedup(genome)
        structure, tokens = describe(space, genome)
        ratio = measured["speedup"] / predicted
        records.append({"kind": kind, "genome": list(map(int, genome)), "structure": structure, "tokens": tokens,
                        "predicted_speedup": predicted, "measured_speedup": measured["speedup"],
                        "measured_quartiles": measured["quartiles"], "ratio": ratio,
                        "meets_budget": accel.meets_budget(measured)})
        rows.append([i, kind, structure, tokens, f"{predicted:.2f}x", f"{measured['speedup']:.2f}x "
                     f"({measured['quartiles'][0]:.2f}-{measured['quartiles'][1]:.2f})", f"{ratio:.3f}"])
        print(f"plan {i + 1}/{len(plans)}: predicted {predicted:.2f}x, measured {measured['speedup']:.2f}x", flush=True)
    t = accel.table
    print(f"\nlatency table on {t.device}, attention {t.attention}: dense {1000 * t.dense:.1f} ms, scale "
          f"{t.scale:.3f}, rest {1000 * t.rest:.1f} ms; each plan measured as the median of {repeats} "
          f"interleaved rounds ({time.perf_counter() - start:.0f} s for {len(plans)} plans)\n")
    print(markdown_table(["#", "plan", "structure (per block)", "visual tokens", "predicted", "measured (quartiles)",
                 "measured / predicted"], rows))
    with_tokens = [r["ratio"] for r in records if r["tokens"] != "-"]
    without = [r["ratio"] for r in records if r["tokens"] == "-"]
    print(f"\nall: {spread([r['ratio'] for r in records])}")
    print(f"with visual-token pruning: {spread(with_tokens)}")
    print(f"without: {spread(without)}")
    summary = {"device": t.device, "attention": t.attention, "repeats": repeats, "plans": records,
               "table": {"dense": t.dense, "rest": t.rest, "scale": t.scale}}
    if budget is not None:
        target = t.dense / budget
        on = [r for r in records if r["kind"] == "on budget"]
        met = sum(r["meets_budget"] for r in on)
        print(f"budget plans (predicted >= {target:.2f}x): {met} of {len(on)} meet the budget measured "
              f"(min_speedup={accel.settings.min_speedup}, max_prefill_ms={accel.settings.max_prefill_ms})")
        summary["budget"] = {"predicted_target": target, "min_speedup": accel.settings.min_speedup,
                             "met": met, "plans": len(on)}
    (out / "latency_accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rows: {out / 'latency_accuracy.json'}")
    return summary


if __name__ == "__main__":
    main()
