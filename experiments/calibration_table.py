"""Toy test accuracy under uniform pruning of all language-model linear layers, per method and sparsity.

    python experiments/calibration_table.py                      # magnitude and Wanda at 30/50/60/70%
    python experiments/calibration_table.py --methods magnitude wanda sparsegpt --targets 0.3 0.5 0.6 0.7 2:4

Calibration: the first --n-calib records of the val split (letter and short prompts alternating); evaluation: the
test split in letter format (and likelihood format with --likelihood). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from efficientllava.data.toy_benchmark import build_toy_benchmark
from efficientllava.evaluation import evaluate
from efficientllava.models import TOY_MODEL_DIR, load_llava
from efficientllava.pruning import prune_model, select_layers, sparsity
from efficientllava.pruning.toy_calibration import prompt_batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(TOY_MODEL_DIR))
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda"])
    parser.add_argument("--targets", nargs="+", default=["0.3", "0.5", "0.6", "0.7"])
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--likelihood", action="store_true", help="also score options by likelihood")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the model is pruned and evaluated (cpu, cuda, ...)")
    parser.add_argument("--relation-form", default=None, help="the benchmark's relation_form (default: its own)")
    parser.add_argument("--categories", nargs="+", default=None, help="the benchmark's categories (default: its own)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    options = {"categories": args.categories}
    if args.relation_form is not None:
        options["relation_form"] = args.relation_form
    data = build_toy_benchmark(args.seed, **options)
    test = data["test"] if args.n_test is None else data["test"].select(range(args.n_test))
    calib_records = [data["val"][i] for i in range(args.n_calib)]
    dense, processor = load_llava(args.model, device=args.device)
    batches = prompt_batches(processor, calib_records)
    layers = list(select_layers(dense))
    modes = ["letter", "likelihood"] if args.likelihood else ["letter"]

    def row(name, target, model, seconds=None):
        cells = [name, target]
        for mode in modes:
            cells.append(f"{evaluate(model, processor, test, mode=mode)['acc']:.2f}")
        cells.append(f"{sparsity(model, layers):.3f}")
        cells.append("" if seconds is None else f"{seconds:.1f}")
        print("| " + " | ".join(cells) + " |", flush=True)
        return float(cells[2])

    head = ["method", "target"] + [f"test acc ({m}) %" for m in modes] + ["achieved sparsity", "prune time (s)"]
    print(f"model: {args.model}; {len(layers)} language-model linear layers; test n={len(test)}; "
          f"calibration n={args.n_calib} (val)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = row("dense", "-", dense)
    for method in args.methods:
        for target in args.targets:
            model = copy.deepcopy(dense)
            value = target if ":" in target else float(target)
            start = time.perf_counter()
            prune_model(model, {name: value for name in layers}, method, batches)
            row(method, target, model, time.perf_counter() - start)
    print(f"\n(dense letter accuracy {base:.2f}%)")


if __name__ == "__main__":
    main()
