"""Structured shrinking of the language model: whole MLP channels and whole attention heads are removed, so every
shrunk layer is a smaller dense matrix and runs faster on any kernel (masks on dense kernels buy no speed).

Units of a decoder block (Llama layout: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj):
- MLP channel j: row j of gate_proj and up_proj, column j of down_proj.
- KV group g: key/value head g and the `group = heads / kv_heads` query heads that share it (grouped-query attention;
  group = 1 for multi-head attention): its rows of q_proj, k_proj, v_proj and its columns of o_proj. Removing only
  some query heads of a group would leave KV heads serving different numbers of query heads, which one
  `num_key_value_groups` per layer cannot express, so that is refused. An attention ratio is the fraction of query
  heads removed and must remove whole groups (kv_heads stays a divisor of heads).

Importance from calibration inputs X of down_proj / o_proj (n tokens, padding excluded), W that layer's weight:
- "wanda": score_j = sum_i |W_ij| * ||X_j||_2 (Wanda's score summed over the column j a channel owns),
- "flap":  score_j = var(X_j) * ||W_:j||_2^2 (FLAP's fluctuation: how far the output moves when input j is replaced by
  its calibration mean).
A KV group's score is the sum of its columns' scores in o_proj. The lowest-scoring units are removed.

Compensation (FLAP): a removed input j is replaced by its calibration mean, so the layer keeps W_:j * mean_j on
average: bias += W[:, removed] @ mean[removed] (down_proj / o_proj get a bias when they had none).

`StructureMasker` gives the same outputs without reshaping anything (inputs of down_proj / o_proj multiplied by a
kept-mask, compensation added to their outputs): the search scores candidates that way, then shrinks for real.

Saving: a transformers config holds one intermediate size and one head count for all layers, so `shrink_model`
records the per-block sizes in `config.efficientllava_structure`; `save_pretrained` writes it into config.json and
`load_shrunk` (called by `efficientllava.models.load_llava`) rebuilds the blocks at those sizes before loading the
safetensors weights, refusing weights whose shapes do not match the record. A stock
`LlavaForConditionalGeneration.from_pretrained` cannot hold per-layer sizes and fails on the first shrunk tensor.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from efficientllava.pruning.calibration import calibrated_blocks, check_batches
from efficientllava.pruning.layers import decoder_blocks, find_layers

IMPORTANCE = ("flap", "wanda")
COMPONENTS = ("mlp", "attn")
RECORD_KEY = "efficientllava_structure"
FORMAT = "efficientllava.structure/1"


class StructureError(ValueError):
    """A structured-shrinking request that does not fit the model (unknown block, bad ratio, broken GQA groups)."""


class ShrunkModelError(ValueError):
    """A saved shrunk model whose weights do not match its recorded per-block sizes."""


# ---- geometry ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockGeometry:
    """The sizes of one decoder block, read from its modules (so they are right after shrinking too)."""

    path: str
    index: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def units(self, component: str) -> int:
        return self.intermediate if component == "mlp" else self.kv_heads


def _parts(block: nn.Module, path: str):
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    needed = [("self_attn", attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
              ("mlp", mlp, ("gate_proj", "up_proj", "down_proj"))]
    for name, module, children in needed:
        missing = [c for c in children if not isinstance(getattr(module, c, None), nn.Linear)]
        if module is None or missing:
            raise StructureError(
                f"decoder block {path!r} has no {name}.{(missing or children)[0]} linear layer; structured shrinking "
                "expects Llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)")
    return attn, mlp


def block_paths(model: nn.Module) -> list[str]:
    """Module paths of the language model's decoder blocks, in order."""
    layers = {n: i for n, i in find_layers(model).items() if i.component == "language_model"}
    paths = decoder_blocks(layers)
    if not paths:
        raise StructureError("the model has no language-model decoder blocks; expected a LLaVA")
    return paths


def decoder_geometry(model: nn.Module) -> dict[str, BlockGeometry]:
    """{block path: its sizes} for every decoder block of the language model."""
    out = {}
    for index, path in enumerate(block_paths(model)):
        attn, mlp = _parts(model.get_submodule(path), path)
        head_dim = int(getattr(attn, "head_dim", 0) or 0)
        if head_dim <= 0 or attn.q_proj.out_features % head_dim or attn.k_proj.out_features % head_dim:
            raise StructureError(f"block {path!r}: cannot read the head size of its attention (head_dim "
                                 f"{head_dim}); expected q_proj/k_proj outputs that are multiples of head_dim")
        heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        out[path] = BlockGeometry(path, index, attn.q_proj.in_features, heads, kv_heads, head_dim,
                                  mlp.down_proj.in_features)
    return out


# ---- plans: per-block ratios -> unit counts ---------------------------------------------------------------------
def ratio_span(whole: bool = False) -> str:
    return "[0, 1]" if whole else "[0, 1)"


def is_ratio(value, whole: bool = False) -> bool:
    """A removed fraction in [0, 1); with `whole` (an MLP: ratio 1.0 removes all of it) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return False
    return 0 <= value <= 1 if whole else 0 <= value < 1


def check_ratio(value, what: str, whole: bool = False) -> float:
    if not is_ratio(value, whole):
        raise StructureError(f"{what} is {value!r}; expected a ratio in {ratio_span(whole)} (the fraction removed)")
    return float(value)


def kept_channels(geometry: BlockGeometry, ratio: float, multiple: int = 1) -> int:
    """MLP channels kept at `ratio` removed; the removed count is rounded to a multiple of `multiple`. Ratio 1.0
    removes the block's whole MLP (0 channels: with compensation the MLP's output becomes its calibration mean)."""
    ratio = check_ratio(ratio, f"block {geometry.path!r}: MLP ratio", whole=True)
    if ratio == 1.0:
        return 0
    removed = int(round(ratio * geometry.intermediate / multiple)) * multiple
    kept = geometry.intermediate - removed
    if kept < 1:
        raise StructureError(f"block {geometry.path!r}: MLP ratio {ratio} removes all {geometry.intermediate} "
                             "channels; expected a ratio that keeps at least one, or 1.0 to remove the whole MLP")
    return kept


def kept_groups(geometry: BlockGeometry, ratio: float) -> int:
    """KV groups kept when `ratio` of the query heads is removed; refuses ratios that split a group."""
    ratio = check_ratio(ratio, f"block {geometry.path!r}: attention ratio")
    removed = int(round(ratio * geometry.heads))
    if removed % geometry.group:
        whole = sorted({g * geometry.group / geometry.heads for g in range(geometry.kv_heads)})
        raise StructureError(
            f"block {geometry.path!r}: attention ratio {ratio} removes {removed} of {geometry.heads} query heads, but "
            f"heads come in groups of {geometry.group} sharing one KV head (grouped-query attention, "
            f"{geometry.kv_heads} KV heads); removing part of a group would break it. Expected a ratio that removes "
            f"whole groups: one of {[round(w, 4) for w in whole]}")
    kept = geometry.kv_heads - removed // geometry.group
    if kept < 1:
        raise StructureError(f"block {geometry.path!r}: attention ratio {ratio} removes every head; expected a "
                             "ratio that keeps at least one KV group")
    return kept


def check_plan(model: nn.Module, plan: dict, multiple: int = 1) -> dict[str, dict[str, int]]:
    """{block path: {'mlp': channels kept, 'attn': KV groups kept}} for a plan {block path: {'mlp': r, 'attn': r}}.

    Raises StructureError naming the first block or ratio that does not fit, before anything changes."""
    if not hasattr(plan, "items"):
        raise StructureError(f"structure plan is a {type(plan).__name__}; expected a mapping block path -> "
                             "{'mlp': ratio, 'attn': ratio}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise StructureError(f"channel_multiple is {multiple!r}; expected a positive integer")
    geometry = decoder_geometry(model)
    counts = {}
    for path, ratios in plan.items():
        if path not in geometry:
            raise StructureError(f"structure plan names block {path!r}, which is not a decoder block of the model; "
                                 f"expected one of {list(geometry)[:2]}...")
        if not hasattr(ratios, "items") or set(ratios) - set(COMPONENTS):
            raise StructureError(f"structure plan for block {path!r} is {ratios!r}; expected a mapping with keys "
                                 f"from {list(COMPONENTS)}")
        g = geometry[path]
        counts[path] = {"mlp": kept_channels(g, ratios.get("mlp", 0.0), multiple),
                        "attn": kept_groups(g, ratios.get("attn", 0.0))}
    return counts


# ---- importance -------------------------------------------------------------------------------------------------
def column_scores(weight: torch.Tensor, stats, method: str) -> torch.Tensor:
    """Importance of each input column of `weight` (out, in) from its calibration statistics."""
    if method not in IMPORTANCE:
        raise StructureError(f"importance {method!r} is unknown; expected one of {list(IMPORTANCE)}")
    w = weight.detach().float()
    sq = stats.sq_norms.to(w.device).float()
    if method == "wanda":
        return w.abs().sum(0) * sq.sqrt()
    mean = stats.sums.to(w.device).float() / stats.tokens
    var = (sq / stats.tokens - mean.pow(2)).clamp_min(0.0)
    return var * w.pow(2).sum(0)


@dataclass
class BlockImportance:
    """Units of one block from most to least important, and the calibration means used for compensation."""

    mlp_order: torch.Tensor  # channel indices, most important first
    attn_order: torch.Tensor  # KV group indices, most important first
    mlp_mean: torch.Tensor  # (intermediate,) mean input of down_proj
    attn_mean: torch.Tensor  # (heads * head_dim,) mean input of o_proj

    def kept(self, component: str, count: int) -> torch.Tensor:
        """The `count` most important units, in increasing index order."""
        order = self.mlp_order if component == "mlp" else self.attn_order
        return order[:count].sort().values


def block_importance(block: nn.Module, geometry: BlockGeometry, down_stats, o_stats, method: str) -> BlockImportance:
    attn, mlp = _parts(block, geometry.path)
    mlp_scores = column_scores(mlp.down_proj.weight, down_stats, method)
    o_scores = column_scores(attn.o_proj.weight, o_stats, method)
    group_scores = o_scores.reshape(geometry.kv_heads, geometry.group * geometry.head_dim).sum(1)
    return BlockImportance(
        torch.argsort(mlp_scores, descending=True, stable=True).cpu(),
        torch.argsort(group_scores, descending=True, stable=True).cpu(),
        (down_stats.sums.float() / down_stats.tokens).cpu(),
        (o_stats.sums.float() / o_stats.tokens).cpu(),
    )


def _stat_names(geometry: dict[str, BlockGeometry], paths) -> dict[str, tuple[str, str]]:
    return {p: (f"{p}.mlp.down_proj", f"{p}.self_attn.o_proj") for p in paths if p in geometry}


def compute_importance(model: nn.Module, batches, method: str = "flap", paths=None) -> dict[str, BlockImportance]:
    """{block path: BlockImportance} from one-shot calibration of the dense model (every block sees dense inputs)."""
    if method not in IMPORTANCE:
        raise StructureError(f"importance {method!r} is unknown; expected one of {list(IMPORTANCE)}")
    geometry = decoder_geometry(model)
    names = _stat_names(geometry, paths if paths is not None else list(geometry))
    batches = check_batches(batches)
    stats = {}
    for _, group_stats in calibrated_blocks(model, batches, [n for pair in names.values() for n in pair],
                                            need=("sq_norms", "sums"), sequential=False):
        stats.update(group_stats)
    return {p: block_importance(model.get_submodule(p), geometry[p], stats[d], stats[o], method)
            for p, (d, o) in names.items()}


# ---- shrinking one block ----------------------------------------------------------------------------------------
def new_linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    """An nn.Linear on `like`'s device and dtype; zero-width ones (a removed MLP) without torch's no-op-init
    warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_f, out_f, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = new_linear(weight.shape[1], weight.shape[0], bias is not None, old)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _keep_rows(layer: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    rows = rows.to(layer.weight.device)
    bias = layer.bias.detach()[rows] if layer.bias is not None else None
    return _linear_like(layer, layer.weight.detach()[rows], bias)


def compensation(layer: nn.Linear, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed]: what the removed inputs contributed on average (float32)."""
    removed = torch.ones(layer.in_features, dtype=torch.bool)
    removed[keep.cpu()] = False
    removed = removed.to(layer.weight.device)
    w = layer.weight.detach().float()
    return w[:, removed] @ mean.to(w.device).float()[removed]


def _keep_columns(layer: nn.Linear, cols: torch.Tensor, mean: torch.Tensor | None) -> nn.Linear:
    cols = cols.to(layer.weight.device)
    bias = layer.bias.detach().float().clone() if layer.bias is not None else None
    if mean is not None:
        comp = compensation(layer, cols, mean)
        bias = comp if bias is None else bias + comp
    return _linear_like(layer, layer.weight.detach()[:, cols], bias)


def head_rows(groups: torch.Tensor, geometry: BlockGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(query-head rows of q_proj / columns of o_proj, KV rows of k_proj / v_proj) of the kept KV groups."""
    d, g = geometry.head_dim, geometry.group
    q = torch.cat([torch.arange((k * g) * d, (k * g + g) * d) for k in groups.tolist()])
    kv = torch.cat([torch.arange(k * d, (k + 1) * d) for k in groups.tolist()])
    return q, kv


def shrink_block(block: nn.Module, geometry: BlockGeometry, channels: torch.Tensor | None = None,
                 groups: torch.Tensor | None = None, mlp_mean: torch.Tensor | None = None,
                 attn_mean: torch.Tensor | None = None) -> None:
    """Keep only `channels` of the MLP and the KV `groups` of the attention (None: unchanged), in place.

    With `mlp_mean` / `attn_mean` the removed inputs of down_proj / o_proj are compensated into a bias."""
    attn, mlp = _parts(block, geometry.path)
    if channels is not None and len(channels) < geometry.intermediate:
        mlp.gate_proj = _keep_rows(mlp.gate_proj, channels)
        mlp.up_proj = _keep_rows(mlp.up_proj, channels)
        mlp.down_proj = _keep_columns(mlp.down_proj, channels, mlp_mean)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)
    if groups is not None and len(groups) < geometry.kv_heads:
        q, kv = head_rows(groups, geometry)
        attn.q_proj = _keep_rows(attn.q_proj, q)
        attn.k_proj = _keep_rows(attn.k_proj, kv)
        attn.v_proj = _keep_rows(attn.v_proj, kv)
        attn.o_proj = _keep_columns(attn.o_proj, q, attn_mean)


def remove_heads(model: nn.Module, heads: dict[str, list[int]]) -> None:
    """Remove the listed query heads of each block ({block path: [head indices]}); every KV group must be removed
    whole (all its query heads or none), else StructureError names the group. No compensation."""
    geometry = decoder_geometry(model)
    kept = {}
    for path, listed in heads.items():
        if path not in geometry:
            raise StructureError(f"remove_heads names block {path!r}, which is not a decoder block of the model")
        g = geometry[path]
        listed = sorted({int(h) for h in listed})
        bad = [h for h in listed if not 0 <= h < g.heads]
        if bad:
            raise StructureError(f"block {path!r} has query heads 0..{g.heads - 1}; remove_heads asks for {bad}")
        for k in range(g.kv_heads):
            members = set(range(k * g.group, (k + 1) * g.group))
            hit = members & set(listed)
            if hit and hit != members:
                raise StructureError(
                    f"block {path!r}: removing query heads {sorted(hit)} leaves KV group {k} (query heads "
                    f"{sorted(members)}) with {len(members - hit)} of its {g.group} heads; grouped-query attention "
                    "needs whole groups: remove all of a group's heads or none")
        groups = torch.tensor([k for k in range(g.kv_heads) if k * g.group not in listed])
        if len(groups) == 0:
            raise StructureError(f"block {path!r}: remove_heads removes every head; expected at least one group kept")
        kept[path] = groups
    for path, groups in kept.items():
        shrink_block(model.get_submodule(path), geometry[path], groups=groups)
    record_structure(model)


# ---- shrinking a model ------------------------------------------------------------------------------------------
def shrink_model(model: nn.Module, plan: dict, batches=None, importance: str = "flap", compensate: bool = True,
                 sequential: bool = False, channel_multiple: int = 1,
                 scores: dict[str, BlockImportance] | None = None) -> dict:
    """Shrink the blocks of `plan` ({block path: {'mlp': ratio, 'attn': ratio}}) in place; returns the record.

    Importance comes from `scores` (e.g. computed once for a search) or from calibration on `batches`: one-shot
    (every block ranked on the dense model's inputs, FLAP's way) or `sequential` (block i ranked on the outputs of
    the already shrunk blocks < i). Everything is checked before the first block changes."""
    counts = check_plan(model, plan, channel_multiple)
    if importance not in IMPORTANCE:
        raise StructureError(f"importance {importance!r} is unknown; expected one of {list(IMPORTANCE)}")
    geometry = decoder_geometry(model)
    active = [p for p, c in counts.items()
              if c["mlp"] < geometry[p].intermediate or c["attn"] < geometry[p].kv_heads]
    if scores is not None:
        missing = [p for p in active if p not in scores]
        if missing:
            raise StructureError(f"no importance scores for block {missing[0]!r}; expected scores for every block "
                                 "the plan shrinks")

    def shrink(path: str, imp: BlockImportance) -> None:
        c = counts[path]
        shrink_block(model.get_submodule(path), geometry[path], imp.kept("mlp", c["mlp"]),
                     imp.kept("attn", c["attn"]), imp.mlp_mean if compensate else None,
                     imp.attn_mean if compensate else None)

    was_training = model.training
    model.eval()
    try:
        if scores is not None:
            for path in active:
                shrink(path, scores[path])
        elif sequential and active:
            names = _stat_names(geometry, active)
            owner = {n: p for p, pair in names.items() for n in pair}
            for group, stats in calibrated_blocks(model, check_batches(batches),
                                                  [n for p in active for n in names[p]],
                                                  need=("sq_norms", "sums"), sequential=True):
                path = owner[group[0]]
                down, o = names[path]
                shrink(path, block_importance(model.get_submodule(path), geometry[path], stats[down], stats[o],
                                              importance))
        elif active:
            found = compute_importance(model, batches, importance, active)
            for path in active:
                shrink(path, found[path])
    finally:
        model.train(was_training)
    return record_structure(model)


# ---- record, save, load -----------------------------------------------------------------------------------------
def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "text_config", config)


def structure_record(model: nn.Module) -> dict:
    """Every block's sizes and which of down_proj / o_proj carry a bias, for config.json."""
    blocks = {}
    for path, g in decoder_geometry(model).items():
        attn, mlp = _parts(model.get_submodule(path), path)
        blocks[path] = {"heads": g.heads, "kv_heads": g.kv_heads, "intermediate": g.intermediate,
                        "o_proj_bias": attn.o_proj.bias is not None, "down_proj_bias": mlp.down_proj.bias is not None}
    return {"format": FORMAT, "blocks": blocks}


def is_shrunk(model: nn.Module) -> bool:
    cfg = text_config(model)
    bias_default = {"o_proj_bias": bool(getattr(cfg, "attention_bias", False)),
                    "down_proj_bias": bool(getattr(cfg, "mlp_bias", False))}
    for b in structure_record(model)["blocks"].values():
        if (b["heads"] != cfg.num_attention_heads or b["kv_heads"] != cfg.num_key_value_heads
                or b["intermediate"] != cfg.intermediate_size
                or any(b[k] != v for k, v in bias_default.items())):
            return True
    return False


def record_structure(model: nn.Module) -> dict:
    """Store the per-block sizes in the model's config (written by save_pretrained); drop them when dense."""
    record = structure_record(model)
    if is_shrunk(model):
        setattr(model.config, RECORD_KEY, record)
    elif hasattr(model.config, RECORD_KEY):
        delattr(model.config, RECORD_KEY)
    return record


def rebuild(model: nn.Module, record: dict) -> None:
    """Resize every block of a freshly built model to the recorded sizes (weights left uninitialised)."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ShrunkModelError(f"config.json's {RECORD_KEY} has format {found!r}; expected {FORMAT!r}")
    geometry = decoder_geometry(model)
    unknown = [p for p in record["blocks"] if p not in geometry]
    if unknown:
        raise ShrunkModelError(f"config.json's {RECORD_KEY} names block {unknown[0]!r}, which this architecture "
                               "does not have; expected the model the record was written for")
    for path, sizes in record["blocks"].items():
        g = geometry[path]
        attn, mlp = _parts(model.get_submodule(path), path)
        heads, kv, inter = int(sizes["heads"]), int(sizes["kv_heads"]), int(sizes["intermediate"])
        if kv < 1 or heads % kv or heads // kv != g.group or inter < 0:
            raise ShrunkModelError(f"block {path!r} is recorded with {heads} heads / {kv} KV heads / {inter} "
                                   f"channels; expected whole KV groups of {g.group} heads and a channel count >= 0")

        d, h = g.head_dim, g.hidden
        attn.q_proj = new_linear(h, heads * d, attn.q_proj.bias is not None, attn.q_proj)
        attn.k_proj = new_linear(h, kv * d, attn.k_proj.bias is not None, attn.k_proj)
        attn.v_proj = new_linear(h, kv * d, attn.v_proj.bias is not None, attn.v_proj)
        attn.o_proj = new_linear(heads * d, h, bool(sizes["o_proj_bias"]), attn.o_proj)
        mlp.gate_proj = new_linear(h, inter, mlp.gate_proj.bias is not None, mlp.gate_proj)
        mlp.up_proj = new_linear(h, inter, mlp.up_proj.bias is not None, mlp.up_proj)
        mlp.down_proj = new_linear(inter, h, bool(sizes["down_proj_bias"]), mlp.down_proj)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter


def load_shrunk(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """A shrunk LlavaForConditionalGeneration from `path` (safetensors only): the blocks are rebuilt at the sizes
    recorded in config.json before transformers loads the weights, so a tensor whose shape does not match the
    record is refused (ShrunkModelError naming it)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    config = LlavaConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    if record is None:
        raise ShrunkModelError(f"'{path}/config.json' has no {RECORD_KEY}; expected a model saved after "
                               "shrink_model (a dense one loads with LlavaForConditionalGeneration.from_pretrained)")

    def resized_init(self, config):  # the stock class, resized to the record before the weights are loaded
        LlavaForConditionalGeneration.__init__(self, config)
        rebuild(self, record)

    # The stock class resized, under the stock name and module: transformers picks checkpoint key mappings by class
    # name and skips them for classes defined outside its package ("custom code"), which this one is not.
    shrunk_class = type("LlavaForConditionalGeneration", (LlavaForConditionalGeneration,),
                        {"__init__": resized_init, "__module__": LlavaForConditionalGeneration.__module__})
    model, info = shrunk_class.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True,
                                               trust_remote_code=False, ignore_mismatched_sizes=True,
                                               output_loading_info=True)
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, recorded = (list(mismatched[0]) + [None, None])[:3]
        raise ShrunkModelError(
            f"the weights in '{path}' do not match the per-block sizes recorded in config.json's {RECORD_KEY}: "
            f"{key!r} is stored as {list(stored) if stored is not None else '?'} but the record gives "
            f"{list(recorded) if recorded is not None else '?'} ({len(mismatched)} tensor(s)); expected weights "
            "saved together with that config")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ShrunkModelError(f"'{path}' has no weight for {missing[0]!r} ({len(missing)} missing), which the "
                               f"sizes recorded in config.json's {RECORD_KEY} call for; expected weights saved "
                               "together with that config")
    model.__class__ = LlavaForConditionalGeneration  # the subclass only resized; save_pretrained names the stock one
    return model.to(device).eval()


# ---- masks instead of shrinking (search candidates) -------------------------------------------------------------
class StructureMasker:
    """Scores a structure plan without reshaping: the removed inputs of down_proj / o_proj are zeroed and their
    compensation W[:, removed] @ mean[removed] is added to the output, which equals the shrunk model's output (see
    tests). The compensation is computed from the layer's weight as it is at forward time (recomputed when the weight
    changes), so weights may be swapped in between (a bank assembling candidates). Hooks stay installed until
    `remove()`; `set(counts)` switches plans, `clear()` makes the hooks no-ops."""

    def __init__(self, model: nn.Module, scores: dict[str, BlockImportance], compensate: bool = True):
        self.model, self.scores, self.compensate = model, scores, compensate
        self.geometry = decoder_geometry(model)
        self.state: dict[str, dict] = {}
        self.handles, self.hooks = [], []
        for path in scores:
            attn, mlp = _parts(model.get_submodule(path), path)
            for key, layer in ((f"{path}:mlp", mlp.down_proj), (f"{path}:attn", attn.o_proj)):
                pre, post = self._pre(key), self._post(key)
                self.hooks += [pre, post]
                self.handles.append(layer.register_forward_pre_hook(pre))
                self.handles.append(layer.register_forward_hook(post))

    def _hook_functions(self) -> set[int]:
        return {id(h) for h in self.hooks}

    def _pre(self, key):
        def hook(module, args):
            state = self.state.get(key)
            if state is None:
                return None
            return (args[0] * state["mask"].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _post(self, key):
        def hook(module, args, output):
            state = self.state.get(key)
            if state is None or state["mean"] is None:
                return None
            version = (module.weight.data_ptr(), module.weight._version)
            if state["version"] != version:
                state["comp"] = compensation(module, state["kept"], state["mean"])
                state["version"] = version
            return output + state["comp"].to(output.dtype)
        return hook

    def set(self, counts: dict[str, dict[str, int]]) -> None:
        """Apply unit counts {block path: {'mlp': channels kept, 'attn': KV groups kept}} (from check_plan or a
        search space)."""
        state = {}
        for path, c in counts.items():
            g, imp = self.geometry[path], self.scores[path]
            attn, mlp = _parts(self.model.get_submodule(path), path)
            for component, layer, n_units, mean in (("mlp", mlp.down_proj, g.intermediate, imp.mlp_mean),
                                                    ("attn", attn.o_proj, g.kv_heads, imp.attn_mean)):
                count = int(c.get(component, n_units))
                if count >= n_units:
                    continue
                key = f"{path}:{component}"
                kept = imp.kept(component, count)
                cols = kept if component == "mlp" else head_rows(kept, g)[0]
                old = self.state.get(key)
                if old is not None and torch.equal(old["kept"], cols):
                    state[key] = old  # same plan for this layer: keep its cached compensation
                    continue
                mask = torch.zeros(layer.in_features, device=layer.weight.device)
                mask[cols.to(layer.weight.device)] = 1.0
                state[key] = {"mask": mask, "kept": cols, "mean": mean if self.compensate else None,
                              "comp": None, "version": None}
        self.state = state

    def clear(self) -> None:
        self.state = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.state = [], {}

    def shrink(self, model: nn.Module, counts: dict[str, dict[str, int]]) -> dict:
        """Shrink `model` (this model or a copy of it) to exactly the plan `set(counts)` scores; returns the record.

        Hooks of this masker that a copy carried along (deepcopy copies module hooks) are stripped first."""
        if model is self.model:
            self.remove()
        strip_hooks(model, self._hook_functions())
        geometry = decoder_geometry(model)
        for path, c in counts.items():
            imp, g = self.scores[path], geometry[path]
            shrink_block(model.get_submodule(path), g, imp.kept("mlp", int(c.get("mlp", g.intermediate))),
                         imp.kept("attn", int(c.get("attn", g.kv_heads))),
                         imp.mlp_mean if self.compensate else None, imp.attn_mean if self.compensate else None)
        return record_structure(model)


def strip_hooks(model: nn.Module, hook_ids: set[int]) -> None:
    """Remove forward (pre-)hooks whose function is one of `hook_ids` from every module of `model`."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if id(fn) in hook_ids]:
                del hooks[key]
