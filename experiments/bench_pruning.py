"""Time and peak memory of each pruning operator; prints markdown tables.

    python experiments/bench_pruning.py                      # toy LLaVA on the CPU (+ 7B-shaped layers on CUDA)
    python experiments/bench_pruning.py --model /tmp/exp/ckA # a trained toy checkpoint instead of a random one

Table 1 (toy, whole model): `prune_model` over every decoder linear layer, calibration included, sequential; the
bank build (one-shot, 9 ratios); the mean |logit change| on the calibration batches says how much each method moved
the model. Table 2 (CUDA only): one LLaVA-1.5-7B-shaped layer, 4096x11008 (down_proj) and 11008x4096 (gate/up),
fp16, statistics from 128 x 640 random calibration tokens; operator time alone (the Hessian is built beforehand).
Peak memory is the CUDA allocator's peak above the start on CUDA, and the peak resident set above the start on
the CPU (sampled every millisecond, so short peaks can be missed).
"""
from __future__ import annotations

import argparse
import copy
import os
import threading
import time

import torch

from efficientllava.pruning.apply import prune_model
from efficientllava.pruning.bank import PruningBank
from efficientllava.pruning.calibration import model_inputs
from efficientllava.pruning.layers import select_layers, total_params
from efficientllava.pruning.operators import inverse_hessian_factor, prune_weight
from efficientllava.pruning.toy_calibration import toy_batches
from efficientllava.speed import describe_device

METHODS = ("magnitude", "wanda", "sparsegpt")
TARGETS = (0.5, "2:4")
BANK_CHOICES = [round(0.1 * i, 1) for i in range(9)]


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's on CUDA, the process RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.rss()
            self.peak_rss, self.running = self.start, True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak_rss, self.rss()) - self.start


def timed(fn, device: torch.device):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def load_toy(path: str | None, device: torch.device):
    if path:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model, processor = LlavaForConditionalGeneration.from_pretrained(path), AutoProcessor.from_pretrained(path)
    else:
        from efficientllava.toy_model import build_toy_llava

        model, processor = build_toy_llava()
    return model.to(device).eval(), processor


def bench_toy(path: str | None, device: torch.device, samples: int, batch_size: int) -> None:
    dense, processor = load_toy(path, device)
    batches = toy_batches(processor, samples, batch_size)
    names = list(select_layers(dense))
    with torch.no_grad():
        reference = [dense(**model_inputs(b, device)).logits for b in batches]

    def drift(model) -> float:
        with torch.no_grad():
            return sum(float((model(**model_inputs(b, device)).logits - r).abs().mean())
                       for b, r in zip(batches, reference)) / len(batches)

    print(f"\n### Toy LLaVA ({'random' if not path else path}) on {device}: {len(names)} decoder linear layers, "
          f"{total_params(select_layers(dense)) / 1e6:.2f}M weights, {samples} calibration samples, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| method | target | prune_model time (s) | peak memory (MiB) | mean abs logit change |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        for target in TARGETS:
            model = copy.deepcopy(dense)
            policy = {n: target for n in names}
            _, seconds, peak = timed(lambda: prune_model(model, policy, method, batches), device)
            print(f"| {method} | {target} | {seconds:.2f} | {mib(peak)} | {drift(model):.4f} |")
    print("\n| method | bank build, 9 ratios, one-shot (s) | peak memory (MiB) | bank size (MiB) |")
    print("|---|---|---|---|")
    banks = {}
    for method in METHODS:
        bank, seconds, peak = timed(lambda: PruningBank.build(dense, names, BANK_CHOICES, method, batches), device)
        banks[method] = bank
        print(f"| {method} | {seconds:.2f} | {mib(peak)} | {mib(bank.nbytes())} |")
    bench_assembly(dense, processor, banks["sparsegpt"], names, device)


def bench_assembly(model, processor, bank, names, device, n_samples: int = 64, repeats: int = 20) -> None:
    """Assembling a candidate from the bank (every layer changes its ratio) vs one dense forward over 64 samples."""
    forward_batches = toy_batches(processor, n_samples, n_samples)
    generator = torch.Generator().manual_seed(0)
    policies = [{n: BANK_CHOICES[int(torch.randint(len(BANK_CHOICES), (1,), generator=generator))] for n in names}
                for _ in range(repeats)]
    bank.restore(model)
    start = time.perf_counter()
    for policy in policies:
        bank.assemble(model, policy)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assemble = (time.perf_counter() - start) / repeats
    bank.restore(model)
    with torch.no_grad():
        for b in forward_batches:  # warm-up
            model(**model_inputs(b, device))
        start = time.perf_counter()
        for _ in range(3):
            for b in forward_batches:
                model(**model_inputs(b, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward = (time.perf_counter() - start) / 3
    print(f"\nassembling a random candidate from the bank: {assemble * 1e3:.2f} ms; one dense forward over "
          f"{n_samples} samples: {forward * 1e3:.1f} ms; ratio {assemble / forward:.3f}")


def bench_layers(device: torch.device, shapes=((4096, 11008), (11008, 4096)), samples: int = 128,
                 tokens: int = 640) -> None:
    """One layer per (out, in) shape (default: LLaVA-1.5-7B's MLP), fp16, statistics from random tokens."""
    where = describe_device(device)
    print(f"\n### LLaVA-1.5-7B-shaped layers on {where}: fp16 weights, "
          f"{samples}x{tokens} random calibration tokens\n")
    print("| layer (out x in) | method | target | time (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    generator = torch.Generator(device).manual_seed(0)
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, device=device, generator=generator).half() * 0.02
        sq_norms = torch.zeros(in_features, device=device)
        hessian = torch.zeros(in_features, in_features, device=device)
        for _ in range(samples):  # one sample at a time, as calibration hooks see them
            x = torch.randn(tokens, in_features, device=device, generator=generator).half().float()
            sq_norms += x.pow(2).sum(0)
            hessian.addmm_(x.T, x)
        stats = {"sq_norms": sq_norms, "hessian": hessian / (samples * tokens)}
        for method in METHODS:
            for target in TARGETS:
                def run():
                    options = {}
                    if method == "sparsegpt":
                        options["factor"] = inverse_hessian_factor(stats["hessian"])
                    return prune_weight(method, weight, target, stats, **options)

                run()  # warm-up (kernels, allocator)
                _, seconds, peak = timed(run, device)
                print(f"| {out_features}x{in_features} | {method} | {target} | {seconds:.2f} | {mib(peak)} |")
        del weight, hessian, stats


def bench_whole(shape: str, device: torch.device, samples: int = 128, batch_size: int = 8, blocks: int | None = None,
                methods=("wanda", "sparsegpt")) -> None:
    """Every language-model linear layer of a LLaVA-1.5-shaped model at 50%: SparseGPT and Wanda, sequential, with
    `samples` calibration samples of 576 image + 64 text tokens. Wanda's operator time is also given alone (statistics
    gathered beforehand), as is the peak memory of the whole process on the device (model included). `blocks`: only
    the linears of the first `blocks` decoder blocks (calibration stops after the last of them): the working set
    beside the resident model is one block's, so the peak memory is the whole prune's at a fraction of its time."""
    from efficientllava.llava15_shapes import random_batch, random_llava
    from efficientllava.pruning.calibration import calibrate

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    where = describe_device(device)
    rows = []
    for method in methods:
        model = random_llava(shape, device, dtype)
        names = [n for n, info in select_layers(model).items() if info.component == "language_model"
                 and (blocks is None or info.block < blocks)]
        batches = [random_batch(model, batch_size, seed=i) for i in range(max(1, samples // batch_size))]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        prune_model(model, {n: 0.5 for n in names}, method, batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append([method, len(names), f"{seconds:.1f}", f"{peak:.1f}"])
        print(f"  {method}: {len(names)} language-model linears pruned in {seconds:.1f} s (calibration included), "
              f"peak {peak:.1f} GiB", flush=True)
        if method == "wanda":  # the operator alone, statistics gathered beforehand
            stats = calibrate(model, batches, names, need=("sq_norms",))
            weights = {n: model.get_submodule(n).weight for n in names}
            prune_weight("wanda", weights[names[0]], 0.5, stats[names[0]])  # warm-up
            _, alone, _ = timed(lambda: [prune_weight("wanda", weights[n], 0.5, stats[n]) for n in names], device)
            rows.append(["wanda (operator only)", len(names), f"{alone:.2f}", "-"])
            del stats, weights  # they hold this model's weights: the next method's peak must not count them
        del model, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    scope = "Whole" if blocks is None else f"First {blocks} decoder blocks of the"
    print(f"\n### {scope} LLaVA-1.5 {shape}-shaped language model at 50% on {where}: random weights, "
          f"{str(dtype).removeprefix('torch.')}, {samples} calibration samples x 640 tokens, sequential\n")
    print("| method | layers | time (s) | peak device memory, model included (GiB) |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="toy checkpoint directory (default: a random toy)")
    parser.add_argument("--samples", type=int, default=32, help="toy calibration samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--whole", choices=("7b", "13b", "scaled-down"), default=None,
                        help="also prune a whole LLaVA-1.5-shaped language model (7b needs CUDA; scaled-down runs anywhere)")
    parser.add_argument("--whole-samples", type=int, default=128)
    parser.add_argument("--whole-blocks", type=int, default=None, help="only the first N decoder blocks (peak memory)")
    parser.add_argument("--whole-methods", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"])
    args = parser.parse_args()
    if not args.skip_toy:
        bench_toy(args.model, torch.device("cpu"), args.samples, args.batch_size)
    if torch.cuda.is_available() and not args.skip_7b:
        bench_layers(torch.device("cuda"))
    elif not args.skip_7b:
        print("\n(no CUDA device: the LLaVA-1.5-7B-shaped layer table needs one)")
    if args.whole:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type != "cuda" and args.whole != "scaled-down":
            raise SystemExit(f"--whole {args.whole} needs a CUDA device; --whole scaled-down runs on the CPU")
        bench_whole(args.whole, device, args.whole_samples, blocks=args.whole_blocks, methods=args.whole_methods)


if __name__ == "__main__":
    main()
