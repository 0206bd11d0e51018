"""What the projector rounds did to a search's result: its pruned model scored with the projector it carries and with
the dense model's own projector.

    python experiments/projector_effect.py outputs/search/<date>/<time> [more run dirs ...]

For each run directory of search.py (summary.json, pruned_model/, .hydra/config.yaml): accuracy on the run's held-out
split (its n_heldout records and scoring), and on the search samples the rounds held back (the last
search.projector.holdout share of the N) the agreement with the dense model (what search.projector.check=score
compares) and the answer's probability, once with each projector. Prints a markdown table; runs whose rounds were all
rejected carry the original projector and show equal columns.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from efficientllava.models import load_llava
from efficientllava.projector import load_projector_state, projector_state
from efficientllava.search.fitness import SearchSamples, choice_outcomes, choice_probabilities, task_scores
from efficientllava.search.loop import held_back_count, load_records
from efficientllava.search.settings import read_settings


def scores(model, heldout: SearchSamples, check: SearchSamples | None, reference) -> dict:
    out = {"heldout_acc": 100.0 * task_scores(model, heldout).mean().item()}
    if check is not None:
        out["check_agreement"] = 100.0 * choice_outcomes(model, check, reference)[1].mean().item()
        out["check_probability"] = 100.0 * choice_outcomes(model, check)[1].mean().item()
    return out


def run_effect(run: Path) -> dict:
    summary_path, config_path = run / "summary.json", run / ".hydra" / "config.yaml"
    for path in (summary_path, config_path, run / "pruned_model"):
        if not path.exists():
            raise SystemExit(f"{run}: {path.name} is missing; expected the directory of a finished search.py run")
    summary = json.loads(summary_path.read_text())
    cfg = OmegaConf.load(config_path)
    settings = read_settings(cfg)
    dense, processor = load_llava(summary["model"], device="cpu")
    search, heldout = load_records(cfg, settings, processor)
    scoring, batch = str(cfg.get("scoring", "letter")), settings.eval_batch_size
    n_check = held_back_count(settings, len(search))
    heldout_samples = SearchSamples.build(heldout, processor, batch, scoring=scoring)
    check = SearchSamples.build(search[len(search) - n_check:], processor, batch, scoring=scoring) if n_check else None
    reference = choice_probabilities(dense, check) if check is not None else None
    pruned, _ = load_llava(run / "pruned_model", device="cpu")
    carried = scores(pruned, heldout_samples, check, reference)
    load_projector_state(pruned, projector_state(dense))
    original = scores(pruned, heldout_samples, check, reference)
    return {"run": str(run), "projector": summary["pruned"].get("projector", ""), "n_check": n_check,
            "carried": carried, "original": original}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | projector carried | held-out acc: carried / original | held-back agreement: carried / original "
          "| held-back answer probability: carried / original |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        r = run_effect(run)
        c, o = r["carried"], r["original"]

        def pair(key: str) -> str:
            return f"{c[key]:.2f} / {o[key]:.2f}" if key in c else "no samples held back"

        print(f"| {run} | {r['projector']} | {pair('heldout_acc')} | {pair('check_agreement')} "
              f"| {pair('check_probability')} |", flush=True)


if __name__ == "__main__":
    main()
