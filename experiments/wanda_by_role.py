"""Where Wanda loses to magnitude: one layer role pruned by one operator, every other role by the other.

    python experiments/wanda_by_role.py                 # the shipped toy, 70%, 128 val prompts, 2,000 test records
    python experiments/wanda_by_role.py --ratio 0.6 --model DIR

Every language-model linear layer is pruned to --ratio; the layers of one role (q/k/v/o/gate/up/down) by the
operator named first in the row, the rest by the other. Two sequential prunes: the role's layers first, then the
others, calibrated on the model with the role's layers already pruned. The first two rows prune everything with one
operator in one call. Prints a markdown table of test accuracy (letter scoring).
"""
from __future__ import annotations

import argparse
import copy

import torch

from efficientllava.data.toy_benchmark import build_toy_benchmark
from efficientllava.evaluation import evaluate
from efficientllava.models import TOY_MODEL_DIR, load_llava
from efficientllava.pruning import find_layers, prune_model, select_layers
from efficientllava.pruning.toy_calibration import prompt_batches

OPERATORS = ("wanda", "magnitude")


def layer_roles(model, names) -> dict[str, str]:
    """{layer name: role} for `names`, in their order."""
    registry = find_layers(model)
    return {name: registry[name].role for name in names}


def prune_split(model, names, role: str | None, inside: str, ratio: float, batches, roles: dict[str, str]) -> None:
    """Prune every layer in `names` to `ratio`: those of `role` with `inside`, the others with the other operator.
    role=None prunes everything with `inside` in one call."""
    if inside not in OPERATORS:
        raise ValueError(f"operator {inside!r}: expected one of {OPERATORS}")
    if role is None:
        prune_model(model, {name: ratio for name in names}, inside, batches)
        return
    outside = OPERATORS[1 - OPERATORS.index(inside)]
    mine = [name for name in names if roles[name] == role]
    if not mine:
        raise ValueError(f"no selected layer has role {role!r}; roles here: {sorted(set(roles.values()))}")
    prune_model(model, {name: ratio for name in mine}, inside, batches)
    prune_model(model, {name: ratio for name in names if roles[name] != role}, outside, batches)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TOY_MODEL_DIR))
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.ratio < 1:
        raise SystemExit(f"--ratio is {args.ratio}; expected a sparsity in (0, 1)")
    if args.n_calib < 1:
        raise SystemExit(f"--n-calib is {args.n_calib}; expected at least 1")
    torch.manual_seed(args.seed)
    data = build_toy_benchmark(args.seed)
    test = data["test"] if args.n_test is None else data["test"].select(range(args.n_test))
    calibration = [data["val"][i] for i in range(min(args.n_calib, len(data["val"])))]
    dense, processor = load_llava(args.model, device="cpu")
    batches = prompt_batches(processor, calibration)
    names = list(select_layers(dense))
    roles = layer_roles(dense, names)
    lines = [f"| Wanda on | magnitude on | test acc (letter) % at {args.ratio:.0%} |", "|---|---|---|"]
    rows = [(None, "magnitude"), (None, "wanda")]
    for role in dict.fromkeys(roles.values()):
        rows += [(role, "wanda"), (role, "magnitude")]
    for role, inside in rows:
        model = copy.deepcopy(dense)
        prune_split(model, names, role, inside, args.ratio, batches, roles)
        acc = evaluate(model, processor, test, mode="letter")["acc"]
        if role is None:
            wanda_on, magnitude_on = ("every layer", "-") if inside == "wanda" else ("-", "every layer")
        else:
            wanda_on, magnitude_on = (role, "the rest") if inside == "wanda" else ("the rest", role)
        lines.append(f"| {wanda_on} | {magnitude_on} | {acc:.2f} |")
        print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
