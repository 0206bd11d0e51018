"""The whole search pipeline on a LLaVA-1.5-7B-shaped model with random weights: on a GPU, one command.

    python experiments/bench_7b_search.py                                # LLaVA-1.5-7B shapes, bf16, CUDA
    python experiments/bench_7b_search.py --shape 13b                    # LLaVA-1.5-13B shapes
    python experiments/bench_7b_search.py --scaled-down --device cpu     # the same pipeline, tiny widths, CPU

The model is built with `from_config` from LLaVA-1.5's published config values (CLIP ViT-L/14 at 336 px: 576 image
tokens; Vicuna's Llama decoder; vocabulary 32,064) with random weights, so nothing is downloaded. The processor
has LLaVA-1.5's image size and prompt layout and the toy's word-level tokenizer (a tokenizer changes no shape). The
job is `search.py`'s: 64 toy-benchmark search samples (prompts of about 620 tokens, as LLaVA-1.5's), a Wanda bank
(masks mode), evolution with projector rounds, the final SparseGPT prune and a held-out evaluation. `--scaled-down`
keeps the image size, token counts and vocabulary and shrinks widths and depths. Random weights answer at chance:
only the costs are worth reading. Prints time per candidate, bank time, final prune time, total time and peak
GPU memory, and writes them to <out>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from efficientllava.llava15_shapes import SHAPES, llava15_config, llava15_processor

ROOT = Path(__file__).resolve().parents[1]


def write_model_dir(path: Path, shape: str) -> Path:
    """config.json + processor files, no weights: load with model.random_init=true."""
    path.mkdir(parents=True, exist_ok=True)
    llava15_config(shape).save_pretrained(path)
    llava15_processor().save_pretrained(path)
    return path


# EfficientLLaVA's own space: per-layer weight sparsity (whatever else conf/search offers is switched off)
WEIGHTS_ONLY = ["++search.structure.enabled=false", "++search.tokens.enabled=false",
                "++search.latency.min_speedup=null", "++search.latency.max_prefill_ms=null"]


def overrides(args, model_dir: Path, run_dir: Path) -> list[str]:
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return [
        f"model.path={model_dir}", "model.random_init=true", f"model.dtype={dtype}", f"model.device={args.device}",
        f"data.build.sizes={{train:8,val:{args.n_search},test:{args.n_heldout}}}",
        f"+data.build.cache_dir={run_dir / 'data_cache'}", "logger=none",
        f"n_search={args.n_search}", f"n_heldout={args.n_heldout}", "heldout_top=1", "speed_repeats=2",
        "final_rerank=1",  # the search's best is pruned, as in the measured runs (a try is a whole 7B prune)
        f"eval_batch_size={args.batch_size}", "save_pruned_model=false",
        f"search.population={args.population}", f"search.generations={args.generations}",
        f"search.top_k={max(2, args.population // 4)}", "search.choices=[0.3,0.4,0.5,0.6,0.7]",
        "search.eta=0.00125", f"search.projector.every={args.projector_every}", "search.projector.top_k=2",
        f"search.projector.steps={args.projector_steps}", "search.projector.holdout=0.0",  # the paper's rounds
        f"search.projector.batch_size={min(args.batch_size, 8)}",
        "bank.mode=masks", "++bank.device=model", f"bank.batch_size={min(args.batch_size, 8)}",
        f"final.batch_size={min(args.batch_size, 8)}",
    ] + ([] if args.full_space else WEIGHTS_ONLY)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--scaled-down", action="store_true", help="tiny widths and depths (same image and vocab)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--n-search", type=int, default=64)
    parser.add_argument("--n-heldout", type=int, default=64)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--projector-steps", type=int, default=2)
    parser.add_argument("--projector-every", type=int, default=2, help="a projector round before every n-th generation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full-space", action="store_true", help="search conf/search's whole space (structure, "
                        "tokens, latency budget where enabled) instead of the paper's per-layer weight sparsity")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_7b_search")
    args = parser.parse_args(argv)
    shape = "scaled-down" if args.scaled_down else args.shape

    import logging

    from hydra import compose, initialize_config_dir

    import efficientllava  # noqa: F401  (config resolvers)
    from efficientllava.models import parameter_count
    from efficientllava.search.loop import report, run_search

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the search's stage log
    start = time.perf_counter()
    run_dir = args.out / f"{shape}-{time.strftime('%Y%m%d-%H%M%S')}"
    model_dir = write_model_dir(run_dir / "model", shape)
    n_params = parameter_count(llava15_config(shape))
    print(f"LLaVA-1.5 {shape} shapes: {n_params / 1e9:.3f}B parameters, random weights, on {args.device}")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=overrides(args, model_dir, run_dir))
    summary = run_search(cfg, run_dir)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    result = {
        "shape": shape, "parameters": n_params, "device": args.device, "dtype": cfg.model.dtype,
        "n_search": summary["n_search"], "candidates": summary["candidates_evaluated"],
        "seconds_per_candidate": summary["seconds_per_candidate"],
        "wall_seconds_per_candidate": summary["wall_seconds_per_candidate"],
        "candidate_to_dense_forward": summary["candidate_to_dense_forward"],
        "bank_seconds": summary["bank_seconds"], "search_seconds": summary["search_seconds"],
        "final_prune_seconds": summary["pruned"]["prune_seconds"],
        "projector_round_seconds": [r.get("seconds") for r in summary["projector_rounds"]],
        "total_seconds": total, "peak_gpu_memory_gib": peak, "run_dir": str(run_dir),
    }
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report(summary))
    print(f"time per candidate: {result['seconds_per_candidate']:.3f} s scoring "
          f"({result['wall_seconds_per_candidate']:.3f} s wall incl. bookkeeping and projector rounds)")
    print(f"bank: {result['bank_seconds']:.1f} s   final prune (SparseGPT, sequential): "
          f"{result['final_prune_seconds']:.1f} s   total: {total:.1f} s")
    print("peak GPU memory: " + (f"{peak:.1f} GiB" if peak is not None else "n/a (CPU run)"))
    return result


if __name__ == "__main__":
    main()
