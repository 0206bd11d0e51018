"""How far Wanda's input-norm weighting moves its masks away from magnitude's, layer by layer.

    python experiments/activation_profile.py                 # the shipped toy, 128 val prompts, 70%
    python experiments/activation_profile.py --ratio 0.6 --n-calib 256

Wanda scores |W_ij| * ||X_j||_2; where the input channels' norms are nearly equal it prunes what magnitude prunes.
For every language-model linear layer, on the dense model (one-shot calibration, the prompts calibration_table.py
uses): the largest channel norm over the median, the largest channel's share of the summed squared norms, and the
share of magnitude's pruned weights that Wanda prunes too at --ratio (per row, as both operators do). Prints a
markdown table.
"""
from __future__ import annotations

import argparse

import torch

from efficientllava.data.toy_benchmark import build_toy_benchmark
from efficientllava.models import TOY_MODEL_DIR, load_llava
from efficientllava.pruning import calibrate, get_linear, select_layers
from efficientllava.pruning.operators import magnitude, wanda
from efficientllava.pruning.toy_calibration import prompt_batches


def layer_row(name: str, weight: torch.Tensor, sq_norms: torch.Tensor, ratio: float) -> dict:
    norms = sq_norms.float().sqrt()
    _, keep_magnitude = magnitude(weight, ratio)
    _, keep_wanda = wanda(weight, ratio, {"sq_norms": sq_norms})
    pruned_magnitude = ~keep_magnitude
    both = (pruned_magnitude & ~keep_wanda).sum().item()
    return {"layer": name, "max_over_median": (norms.max() / norms.median()).item(),
            "top_share": (sq_norms.max() / sq_norms.sum()).item(),
            "agreement": both / max(int(pruned_magnitude.sum().item()), 1)}


def profile(model, batches, ratio: float) -> list[dict]:
    names = list(select_layers(model))
    stats = calibrate(model, batches, names, need=("sq_norms",))
    return [layer_row(n, get_linear(model, n).weight.detach(), stats[n].sq_norms, ratio) for n in names]


def table(rows: list[dict], ratio: float) -> str:
    lines = [f"| layer | largest / median channel norm | largest channel's share | magnitude's pruned weights "
             f"Wanda prunes too ({ratio:.0%}) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['max_over_median']:.1f} | {r['top_share']:.3f} | {r['agreement']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TOY_MODEL_DIR))
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.ratio < 1:
        raise SystemExit(f"--ratio is {args.ratio}; expected a sparsity in (0, 1)")
    if args.n_calib < 1:
        raise SystemExit(f"--n-calib is {args.n_calib}; expected at least 1")
    data = build_toy_benchmark(args.seed)
    records = [data["val"][i] for i in range(min(args.n_calib, len(data["val"])))]
    model, processor = load_llava(args.model, device="cpu")
    batches = prompt_batches(processor, records)
    out = table(profile(model, batches, args.ratio), args.ratio)
    print(out)
    return out


if __name__ == "__main__":
    main()
