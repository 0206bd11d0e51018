"""Dense vs pruned prefill latency and decode tokens/s, measured in one process (interleaved, median); markdown tables.

    python experiments/bench_speed.py                                  # the shipped toy on the CPU (+ 7B shape on CUDA)
    python experiments/bench_speed.py --pruned-model outputs/search/<run>/pruned_model   # add a searched model
    python experiments/bench_speed.py --only 7b                        # LLaVA-1.5-7B shape only (CUDA)

Toy, on the device at hand: prefill (image + prompt, ~53 tokens of which 16 are image tokens) of B distinct toy
prompts at B = 1, 8, 64, and 16 greedy decode steps at B = 1, 8 (one prompt repeated: no padding). Plans: fixed
structured / visual-token plans, shrunk for real with FLAP importance (64 toy val prompts) and bias compensation, and
a searched pruned model (`--pruned-model`, e.g. a search's pruned_model/, loaded with its recorded sizes and token
pruning). glibc's heap is made steady first (`--steady-heap-mib`), as the search does, so a model times the same
here as in the search that wrote it. Columns: held-out accuracy (`--scoring`: option likelihood, as the search scores
the shipped toy, or option letter) on the first `--n-test` records of the toy test split, parameters, prefill FLOPs
of one B=8 batch, measured prefill speedup per B, measured decode speedup per B.

LLaVA-1.5-7B shape (CUDA only): LLaVA-1.5's published sizes (CLIP ViT-L/14-336, Vicuna-7B) with random weights in
float16, 576 image tokens + 64 text tokens, B = 1 and 8; plans: half the MLP channels and half the heads of every
block, FastV after layer 2 keeping 25% of the image tokens, and both; prefill ms and speedup, decode tokens/s and
speedup. Then 2:4 matmuls of the MLP shapes, dense vs torch's semi-structured tensors (default backend, CUTLASS and
cuSPARSELt) at 640 and 8 x 640 tokens: what `pruning/semi_structured.export_semi_structured` decides from.
"""
from __future__ import annotations

import argparse
import copy

import torch

from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.host_memory import HostMemoryError, steady_heap
from efficientllava.markdown import markdown_table
from efficientllava.pruning.structured import compute_importance, decoder_geometry, record_structure, shrink_block
from efficientllava.pruning.structured import shrink_model
from efficientllava.speed import (SpeedError, decode_speedup, describe_device, graphed_prefill_speedup, parameter_count,
                                  prefill_flops, prefill_speedup)
from efficientllava.token_pruning import VisualTokenPruner

TOY_PLANS = {  # name: (MLP ratio, attention ratio, (K, R) or None)
    "MLP 50%": (0.5, 0.0, None),
    "MLP 50% + heads 50%": (0.5, 0.5, None),
    "FastV K=1 R=0.25": (0.0, 0.0, (1, 0.25)),
    "FastV K=1 R=0.0625 (one image token)": (0.0, 0.0, (1, 0.0625)),
    "MLP 50% + heads 50% + FastV K=1 R=0.25": (0.5, 0.5, (1, 0.25)),
    "MLP 75% + heads 50% + FastV K=1 R=0.25": (0.75, 0.5, (1, 0.25)),
    "MLP 75% + FastV K=1 R=0.5": (0.75, 0.0, (1, 0.5)),
    "MLP 75% + FastV K=1 R=0.25": (0.75, 0.0, (1, 0.25)),
}
BIG_PLANS = {
    "MLP 50% + heads 50%": (0.5, 0.5, None),
    "FastV K=2 R=0.25": (0.0, 0.0, (2, 0.25)),
    "MLP 50% + heads 50% + FastV K=2 R=0.25": (0.5, 0.5, (2, 0.25)),
}


def inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS}


# ---- toy ----------------------------------------------------------------------------------------------------------
def toy_batches(processor, records, sizes):
    from efficientllava.data.collate import Collator
    from efficientllava.data.prompts import LETTER

    collator = Collator(processor)
    prefill = {b: inputs(collator.prompts(records[:b], [LETTER] * b)) for b in sizes}
    one = inputs(collator.prompts(records[:1], [LETTER]))
    decode = {b: {k: v.expand(b, *v.shape[1:]).contiguous() for k, v in one.items()} for b in (1, 8)}
    return prefill, decode


def toy_plan(model, scores, mlp: float, attn: float, tokens):
    pruned = copy.deepcopy(model)
    if mlp or attn:
        shrink_model(pruned, {p: {"mlp": mlp, "attn": attn} for p in decoder_geometry(pruned)}, scores=scores)
    if tokens:
        VisualTokenPruner(pruned, *tokens).attach()
    return pruned


def bench_toy(args) -> None:
    from efficientllava.evaluation import evaluate
    from efficientllava.models import TOY_MODEL_DIR, load_llava
    from efficientllava.pruning.toy_calibration import toy_records

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    dense, processor = load_llava(TOY_MODEL_DIR, device=device, attn_implementation=args.attn_implementation,
                                  trim_vision_tower=args.trim_vision_tower)
    val, test = toy_records(64, "val"), toy_records(args.n_test, "test")
    calibration, _ = toy_batches(processor, val, [64])
    scores = compute_importance(dense, [calibration[64]], "flap")
    prefill, decode = toy_batches(processor, val, (1, 8, 64))
    models = {name: toy_plan(dense, scores, *plan) for name, plan in TOY_PLANS.items()}
    if args.pruned_model:
        models[f"searched ({args.pruned_model})"] = load_llava(args.pruned_model, device=device,
                                                               attn_implementation=args.attn_implementation,
                                                               trim_vision_tower=args.trim_vision_tower)[0]
    print(f"\nToy LLaVA, {describe_device(torch.device(device))}, torch {torch.__version__}: prefill (image + "
          f"prompt) of B toy prompts, {args.decode_steps} greedy decode steps; median of {args.repeats} interleaved "
          "runs, dense and pruned in one process; attention: "
          f"{dense.config.text_config._attn_implementation}; vision-tower layers: "
          f"{dense.config.vision_config.num_hidden_layers}\n")
    dense_acc = evaluate(dense, processor, test, args.scoring)["acc"]
    header = ["plan", f"test acc ({args.scoring}, {len(test)})", "params", "prefill GFLOPs (B=8)",
              *[f"prefill x (B={b})" for b in prefill], *[f"decode x (B={b})" for b in decode]]
    rows = [["dense", f"{dense_acc:.2f}", f"{parameter_count(dense):,}",
             f"{prefill_flops(dense, prefill[8]) / 1e9:.3f}",
             *["1.00"] * (len(prefill) + len(decode))]]
    for name, model in models.items():
        acc = evaluate(model, processor, test, args.scoring)["acc"]
        pre = [prefill_speedup(dense, model, [prefill[b]], args.repeats, 2)["speedup"] for b in prefill]
        dec = [decode_speedup(dense, model, decode[b], args.decode_steps, args.repeats, 1)["speedup"] for b in decode]
        rows.append([name, f"{acc:.2f}", f"{parameter_count(model):,}", f"{prefill_flops(model, prefill[8]) / 1e9:.3f}",
                     *[f"{x:.2f}" for x in pre + dec]])
    print(markdown_table(header, rows))


# ---- LLaVA-1.5-7B shape -------------------------------------------------------------------------------------------
def big_plan(model, mlp: float, attn: float, tokens):
    pruned = copy.deepcopy(model)
    for path, g in decoder_geometry(pruned).items():  # random weights: keep the first units (speed only)
        shrink_block(pruned.get_submodule(path), g, torch.arange(g.intermediate - int(mlp * g.intermediate)),
                     torch.arange(g.kv_heads - int(attn * g.kv_heads)))
    record_structure(pruned)
    if tokens:  # K capped for the scaled-down shape's 2 layers
        layer, keep = tokens
        VisualTokenPruner(pruned, min(layer, len(decoder_geometry(pruned)) - 1), keep).attach()
    return pruned


def bench_7b(args) -> None:
    from efficientllava.llava15_shapes import random_batch, random_llava

    device = torch.device(args.big_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and args.shape != "scaled-down":
        print(f"\nLLaVA-1.5 {args.shape} shape: skipped (no CUDA device here; it needs a GPU with ~30 GB free; "
              "--shape scaled-down runs the same code on the CPU)")
        return
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dense = random_llava(args.shape, device, dtype)
    batches = {b: random_batch(dense, b) for b in (1, 8)}
    print(f"\nLLaVA-1.5 {args.shape} shape (random weights, {str(dtype).removeprefix('torch.')}), "
          f"{describe_device(device)}, torch {torch.__version__}: 576 image + 64 text tokens, prefill and "
          f"{args.decode_steps} decode steps, median of {args.repeats} interleaved runs"
          f"{' (CUDA events)' if device.type == 'cuda' else ''}\n")
    # every plan is timed against the dense model afresh (interleaved): each cell gives pruned / dense of that run
    header = ["plan", "params (B)", *[f"prefill ms pruned / dense (B={b})" for b in batches],
              *[f"prefill x (B={b})" for b in batches], *[f"decode tok/s pruned / dense (B={b})" for b in batches],
              *[f"decode x (B={b})" for b in batches]]
    graphs = device.type == "cuda" and not args.no_cuda_graphs
    if graphs:
        header += [f"graphed prefill ms pruned / dense (B={b})" for b in batches]
        header += [f"graphed prefill x (B={b})" for b in batches]
    rows = [["dense", f"{parameter_count(dense) / 1e9:.2f}", *["-"] * ((6 if graphs else 4) * len(batches))]]
    failures = []
    for name, plan in BIG_PLANS.items():
        pruned = big_plan(dense, *plan)
        pre = {b: prefill_speedup(dense, pruned, [batches[b]], args.repeats, 3) for b in batches}
        dec = {b: decode_speedup(dense, pruned, batches[b], args.decode_steps, args.repeats, 1) for b in batches}
        row = [name, f"{parameter_count(pruned) / 1e9:.2f}",
               *[f"{1000 * pre[b]['pruned_seconds']:.1f} / {1000 * pre[b]['dense_seconds']:.1f}" for b in batches],
               *[f"{pre[b]['speedup']:.2f}" for b in batches],
               *[f"{dec[b]['pruned_tokens_per_s']:.0f} / {dec[b]['dense_tokens_per_s']:.0f}" for b in batches],
               *[f"{dec[b]['speedup']:.2f}" for b in batches]]
        if graphs:
            graphed = {}
            for b in batches:
                try:
                    graphed[b] = graphed_prefill_speedup(dense, pruned, batches[b], args.repeats, 3)
                except SpeedError as err:
                    failures.append(f"{name}, B={b}: {err}")
            row += [f"{1000 * graphed[b]['pruned_seconds']:.1f} / {1000 * graphed[b]['dense_seconds']:.1f}"
                    if b in graphed else "failed" for b in batches]
            row += [f"{graphed[b]['speedup']:.2f}" if b in graphed else "failed" for b in batches]
        rows.append(row)
        del pruned
        torch.cuda.empty_cache()
    print(markdown_table(header, rows))
    if graphs:
        print("\nGraphed: each prefill captured once as a CUDA graph (speed.GraphedPrefill) and replayed, so host-side "
              "launch overhead is gone from both models, as in a serving engine's fixed-shape path.")
    for failure in failures:
        print(f"CUDA-graph capture failed: {failure}")
    bench_two_four(args, device, dtype)


def bench_two_four(args, device, dtype) -> None:
    from efficientllava.pruning.operators import magnitude
    from efficientllava.pruning.semi_structured import _backend, availability, time_layer

    reason = availability(device)
    if reason:
        print(f"\n2:4 semi-structured: skipped ({reason})")
        return
    rows = []
    for out_f, in_f in ((11008, 4096), (4096, 11008)):
        layer = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(magnitude(layer.weight, "2:4")[0])
        for tokens in (640, 8 * 640):
            for backend in (None, "cutlass", "cusparselt"):
                previous = _backend(backend)
                try:
                    result = time_layer(layer, tokens, repeats=max(args.repeats, 20))
                finally:
                    from torch.sparse import SparseSemiStructuredTensor

                    SparseSemiStructuredTensor._FORCE_CUTLASS = previous
                if "error" in result:
                    rows.append([f"{out_f}x{in_f}", tokens, backend or "default", "-", "-", result["error"][:80]])
                else:
                    rows.append([f"{out_f}x{in_f}", tokens, backend or "default", f"{result['dense_ms']:.3f}",
                                 f"{result['sparse_ms']:.3f}", f"{result['speedup']:.2f}x"])
    print("\n2:4 semi-structured matmul vs dense (float16, median of repeats, CUDA events)\n")
    print(markdown_table(["layer (out x in)", "tokens", "backend", "dense ms", "2:4 ms", "speedup"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("toy", "7b"), default=None)
    parser.add_argument("--device", default="auto", help="toy: cpu or auto (the GPU if there is one)")
    parser.add_argument("--pruned-model", default=None, help="a search's pruned_model/ directory to add")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--attn-implementation", default=None,
                        help="toy: attention kernels of every model (eager, sdpa, ...); default transformers'")
    parser.add_argument("--trim-vision-tower", action=argparse.BooleanOptionalAction, default=True,
                        help="toy: drop the vision-tower layers after the image-feature layer in every model, as "
                             "conf/model does (outputs unchanged)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=2000, help="toy test records for the accuracy column")
    parser.add_argument("--shape", choices=("7b", "13b", "scaled-down"), default="7b",
                        help="LLaVA-1.5 shape of the big-model section")
    parser.add_argument("--big-device", default=None, help="device of the big-model section (default: cuda if any)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="big-model section on CUDA: skip the CUDA-graph prefill columns (eager only)")
    parser.add_argument("--scoring", choices=("likelihood", "letter"), default="letter",
                        help="multiple-choice scoring of the accuracy column")
    parser.add_argument("--steady-heap-mib", type=int, default=32,
                        help="glibc keeps blocks up to this size on its heap (efficientllava/host_memory.py); 0: "
                             "leave the allocator alone")
    args = parser.parse_args()
    try:
        print(steady_heap(args.steady_heap_mib))
    except HostMemoryError as error:
        parser.error(f"--steady-heap-mib: {error}")
    if args.only in (None, "toy"):
        bench_toy(args)
    if args.only in (None, "7b"):
        bench_7b(args)


if __name__ == "__main__":
    main()
