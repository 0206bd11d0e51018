"""What one search candidate costs, part by part: assembling it from a mask bank, and its scoring forward.

    python experiments/bench_scoring.py                         # LLaVA-1.5-7B shapes, bf16, CUDA
    python experiments/bench_scoring.py --shape scaled-down     # the same code on the CPU, tiny widths

A LLaVA-1.5-shaped model with random weights (`efficientllava/llava15_shapes.py`), N toy-benchmark val records at
LLaVA-1.5's image size (576 image tokens per prompt), scored as the search scores them: option letter (one forward
over the prompts, the paper's protocol) and option likelihood (the prompt once, then every option's answer tokens
over its cache). The bank is Wanda's, masks mode, beside the model (`bank.device=model`), over every language-model
linear at ratios 0.3..0.7; a candidate is a random policy over those ratios. Median of `--repeats` runs each.
"""
from __future__ import annotations

import argparse
import time

import torch

from efficientllava.llava15_shapes import SHAPES, llava15_processor, random_llava

RATIOS = [0.3, 0.4, 0.5, 0.6, 0.7]


def main(argv=None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=64, help="search samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from efficientllava.data.collate import Collator
    from efficientllava.data.prompts import SHORT
    from efficientllava.pruning import PruningBank, select_layers
    from efficientllava.pruning.toy_calibration import toy_records
    from efficientllava.search.fitness import SearchSamples, letter_predictions
    from efficientllava.speed import compare, describe_device

    device = torch.device(args.device)
    if device.type != "cuda" and args.shape != "scaled-down":
        raise SystemExit(f"--shape {args.shape} needs a CUDA device (a GPU with ~35 GB free); "
                         "--shape scaled-down runs the same code on the CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = random_llava(args.shape, device, dtype), llava15_processor()
    records = toy_records(args.n, "val")
    names = [n for n, i in select_layers(model).items() if i.component == "language_model"]
    calibration = Collator(processor).answers(records[: args.batch_size], [SHORT] * min(args.n, args.batch_size))
    start = time.perf_counter()
    bank = PruningBank.build(model, names, RATIOS, "wanda", [calibration], mode="masks", device="model")
    build = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    policies = iter([{n: RATIOS[int(i)] for n, i in zip(names, torch.randint(len(RATIOS), (len(names),),
                                                                              generator=generator))}
                     for _ in range(args.repeats + 1)])
    assemble = compare({"assemble": lambda: bank.assemble(model, next(policies))}, device, args.repeats)["assemble"]
    print(f"\nLLaVA-1.5 {args.shape} shapes ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"random weights, {str(dtype).removeprefix('torch.')}) on {describe_device(device)}, torch "
          f"{torch.__version__}: N={args.n} toy val records at 576 image tokens each, batch {args.batch_size}; "
          f"Wanda mask bank over {len(names)} linears x {len(RATIOS)} ratios built in {build:.1f} s "
          f"({bank.nbytes() / 2**30:.1f} GiB beside the model); median of {args.repeats}\n")
    rows = []
    for scoring in ("letter", "likelihood"):
        samples = SearchSamples.build(records, processor, args.batch_size, scoring=scoring)
        tokens = sum(int(b["attention_mask"].sum()) + int(b.get("option_lengths", torch.zeros(1)).sum())
                     for b in samples.batches)
        forward = compare({"forward": lambda: letter_predictions(model, samples)}, device, args.repeats)["forward"]
        rows.append([scoring, f"{tokens:,}", f"{forward:.3f}", f"{assemble:.3f}", f"{forward + assemble:.3f}"])
    print("| scoring | tokens | scoring forward (s) | assemble from bank (s) | candidate (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
