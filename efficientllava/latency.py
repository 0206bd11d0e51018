"""A latency table measured once on the target device, so a search can aim at "speedup >= S" or "prefill <= T ms".

The workload is fixed: the prefill (image + prompt) of a list of batches of shape (rows B, padded length T), each
row holding n_image image tokens (for a search: its N scoring samples). The table holds, measured on this device:
- `attn[B:t:g]`: one decoder block's attention half (input norm, self-attention with g KV groups kept, residual) on
  B rows of t tokens, with the same kind of attention mask the real forward uses (none, or a 4-D padding mask);
- `mlp[B:t:c]`: the MLP half (post-attention norm, SwiGLU with c channels kept, residual);
- `dense`: the whole dense prefill of the workload, and `rest`: what is not in the blocks (vision tower, projector,
  embeddings, mask building, final norm, LM head, Python overhead), held fixed.
A plan (kept units per block, visual tokens kept after layer K) is predicted as

    rest + scale * sum over batches and blocks of (attn + mlp at the block's width and token count)

(token count T, or T - n_image + kept image tokens from layer K on). Entries are measured per block shape (blocks of
one shape share them) on a copy of a block shrunk to each width: the fastest of `repeats` timed calls after a warm-up
(on a shared machine noise only adds time), then made monotone: no entry costs more than an entry with at least its
width and tokens (a spike from another job is replaced by the cheapest larger entry; the raw timings are kept in
`raw_attn` / `raw_mlp`).
Blocks timed alone cost less or more than inside the model, so `calibrate` fits rest and scale to two end-to-end
measurements taken together (the search passes the medians of 21 interleaved runs, as its budget check and final
model are measured; the fastest of a few runs let one lucky dense run move the whole table), the dense model and the
most-shrunk plan (without it: scale 1, rest = dense - blocks). The entries are the fastest of their calls, so the
table's shape is the unloaded machine's and its level that of the end-to-end medians.
What the table still leaves out (the visual-token ranking and scatter) shows up in the end-to-end measurements of
the search's front and final model, which are reported beside the predictions.

The table carries the device (GPU name, or CPU with its thread count), dtype, attention implementation, the model's
identity hash and the workload; using it for another device, model or workload raises LatencyTableError naming the
difference.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from efficientllava.pruning.structured import BlockGeometry, decoder_geometry, shrink_block
from efficientllava.speed import describe_device, gc_paused, model_device, timed
from efficientllava.token_pruning import kept_count

FORMAT = "efficientllava.latency/1"


class LatencyTableError(ValueError):
    """A latency table that does not belong to this device, model or workload, or lacks an entry."""


@dataclass(frozen=True)
class Workload:
    shapes: tuple[tuple[int, int], ...]  # (rows, padded length) of each batch
    image_tokens: int  # per row
    padded: bool  # any padding: the real forward builds a 4-D attention mask

    @classmethod
    def of_batches(cls, batches: list[dict], image_token_id: int) -> "Workload":
        if not batches:
            raise LatencyTableError("the latency workload has no batches; expected at least one prompt batch")
        counts = set()
        padded = False
        for b in batches:
            counts |= set((b["input_ids"] == image_token_id).sum(1).tolist())
            mask = b.get("attention_mask")
            padded |= mask is not None and not bool(mask.all())
        if len(counts) != 1:
            raise LatencyTableError(f"the workload's rows hold {sorted(counts)} image tokens; expected the same number "
                                    "in every row (one image per row)")
        return cls(tuple((int(b["input_ids"].shape[0]), int(b["input_ids"].shape[1])) for b in batches),
                   counts.pop(), padded)

    def to_json(self) -> dict:
        return {"shapes": [list(s) for s in self.shapes], "image_tokens": self.image_tokens, "padded": self.padded}

    @classmethod
    def from_json(cls, d: dict) -> "Workload":
        return cls(tuple(tuple(s) for s in d["shapes"]), int(d["image_tokens"]), bool(d["padded"]))

    def tokens_after(self, length: int, keep: float | None) -> int:
        """Tokens a row of padded length `length` carries after visual-token pruning at ratio `keep`."""
        if keep is None or self.image_tokens == 0:
            return length
        return length - self.image_tokens + kept_count(self.image_tokens, keep)


def _key(rows: int, tokens: int, width: int) -> str:
    return f"{rows}:{tokens}:{width}"


def _signature(g: BlockGeometry) -> str:
    return f"h{g.hidden}.q{g.heads}.kv{g.kv_heads}.d{g.head_dim}.i{g.intermediate}"


@dataclass
class LatencyTable:
    device: str
    model: str  # ModelIdentity hash
    dtype: str
    attention: str
    workload: Workload
    layers: list[str]  # signature of every decoder block, in order
    attn: dict[str, dict[str, float]] = field(default_factory=dict)  # signature -> key -> seconds
    mlp: dict[str, dict[str, float]] = field(default_factory=dict)
    raw_attn: dict[str, dict[str, float]] = field(default_factory=dict)  # before the monotone correction
    raw_mlp: dict[str, dict[str, float]] = field(default_factory=dict)
    dense: float = 0.0
    rest: float = 0.0
    scale: float = 1.0  # blocks measured alone x scale = their cost inside the model (two-point calibration)
    anchor: dict = field(default_factory=dict)  # the end-to-end measurement `calibrate` used
    repeats: int = 0
    torch_version: str = ""

    # ---- prediction ---------------------------------------------------------------------------------------------
    def _entry(self, table: dict, what: str, layer: int, rows: int, tokens: int, width: int) -> float:
        sig = self.layers[layer]
        try:
            return table[sig][_key(rows, tokens, width)]
        except KeyError:
            raise LatencyTableError(
                f"the latency table has no {what} entry for block {layer} with {width} "
                f"{'KV groups' if what == 'attention' else 'channels'} kept on {rows} rows x {tokens} tokens; expected "
                "a table measured for this search's choices (measure it again: search.latency.table=null)") from None

    def predict(self, widths: list[tuple[int, int]], token_layer: int | None = None,
                keep: float | None = None) -> float:
        """Seconds of the workload's prefill for per-block (KV groups, channels) kept and visual tokens kept
        (`keep` of the image tokens from layer `token_layer` on; None: no token pruning)."""
        if len(widths) != len(self.layers):
            raise LatencyTableError(f"a plan for {len(widths)} blocks; the table was measured for {len(self.layers)}")
        return self.rest + self.scale * self.blocks(widths, token_layer, keep)

    def blocks(self, widths: list[tuple[int, int]], token_layer: int | None = None, keep: float | None = None) -> float:
        """Sum of the measured block entries of a plan over the workload (no `rest`, no `scale`)."""
        total = 0.0
        for rows, length in self.workload.shapes:
            pruned = self.workload.tokens_after(length, keep)
            for layer, (groups, channels) in enumerate(widths):
                t = pruned if token_layer is not None and keep is not None and layer >= token_layer else length
                total += self._entry(self.attn, "attention", layer, rows, t, groups)
                total += self._entry(self.mlp, "MLP", layer, rows, t, channels)
        return total

    def calibrate(self, dense_seconds: float, dense_widths, anchor_seconds: float, anchor_widths,
                  token_layer: int | None = None, keep: float | None = None) -> None:
        """Fit rest and scale so that the prediction equals two end-to-end measurements taken together: the dense
        model and a shrunk one (`anchor_*`). Blocks timed alone miss what surrounds them inside the model (cache
        state, dispatch); one scale for all block entries absorbs that. Without a usable anchor (no block time
        saved) only `rest` is set from the dense measurement."""
        dense_blocks = self.blocks(dense_widths)
        anchor_blocks = self.blocks(anchor_widths, token_layer, keep)
        self.dense = float(dense_seconds)
        self.scale = 1.0
        if dense_blocks - anchor_blocks > 1e-12 and dense_seconds > anchor_seconds:
            self.scale = (dense_seconds - anchor_seconds) / (dense_blocks - anchor_blocks)
        self.rest = max(dense_seconds - self.scale * dense_blocks, 0.0)
        self.anchor = {"seconds": float(anchor_seconds), "widths": [list(w) for w in anchor_widths],
                       "token_layer": token_layer, "keep": keep, "dense_seconds": float(dense_seconds)}

    def dense_widths(self, model) -> list[tuple[int, int]]:
        return [(g.kv_heads, g.intermediate) for g in decoder_geometry(model).values()]

    # ---- identity -----------------------------------------------------------------------------------------------
    def check(self, device: str, model_hash: str, dtype: str, attention: str, workload: Workload,
              source: str = "the latency table") -> None:
        """Raise LatencyTableError naming the first of device, model, dtype, attention, workload that differs."""
        for what, mine, theirs, hint in (
                ("device", self.device, device, "measure it on this device"),
                ("model identity", self.model, model_hash, "measure it for this model"),
                ("dtype", self.dtype, dtype, "measure it at this dtype"),
                ("attention implementation", self.attention, attention, "measure it with this implementation"),
                ("workload", self.workload.to_json(), workload.to_json(), "measure it for these samples / batch "
                 "size")):
            if mine != theirs:
                raise LatencyTableError(f"{source} was measured with {what} {mine!r}; this run has {theirs!r}; "
                                        f"expected a table measured here ({hint}: search.latency.table=null)")

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d["workload"] = self.workload.to_json()
        return {"format": FORMAT, **d}

    def save(self, path: str | Path) -> Path:
        from efficientllava.outputs import write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table '{path}' does not exist; expected a JSON file written by "
                                    "measure_latency_table (a search writes one to <run dir>/latency_table.json)")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LatencyTableError(f"'{path}' is not a latency table (format {found!r}); expected {FORMAT!r}")
        data.pop("format")
        data["workload"] = Workload.from_json(data["workload"])
        return cls(**data)


# ---- measuring --------------------------------------------------------------------------------------------------
def attention_implementation(model) -> str:
    config = getattr(model.config, "text_config", model.config)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def _block_inputs(model, block_index: int, rows: int, tokens: int, padded: bool):
    """Random hidden states, rotary embeddings and the attention mask the real forward would give the block."""
    from transformers.masking_utils import create_causal_mask

    language_model = model.get_submodule(list(decoder_geometry(model))[0].rsplit(".", 2)[0])
    config = language_model.config
    device, dtype = model_device(model), next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(1234 + block_index)
    hidden = torch.randn(rows, tokens, config.hidden_size, generator=gen).to(device, dtype)
    position_ids = torch.arange(tokens, device=device)[None]
    position_embeddings = language_model.rotary_emb(hidden, position_ids=position_ids)
    mask2d = torch.ones(rows, tokens, dtype=torch.long, device=device)
    if padded:  # one padded position makes the mask materialize as in the padded real batches
        mask2d[-1, -1] = 0
    # no cache, passed by position: transformers 5.24 renamed that argument from past_key_values to cache
    mask = create_causal_mask(config, hidden, mask2d, None, position_ids=position_ids)
    return hidden, position_embeddings, mask, position_ids


def _time(fn, device, repeats: int) -> float:
    with gc_paused():
        fn()  # warm-up
        return min(timed(fn, device) for _ in range(repeats))


def monotone(entries: dict[str, float]) -> dict[str, float]:
    """Each (rows, tokens, width) entry lowered to the cheapest entry of the same rows with at least its tokens and
    width: more work never costs less (what breaks that is noise)."""
    parsed = {k: tuple(int(x) for x in k.split(":")) for k in entries}
    out = {}
    for key, (rows, tokens, width) in parsed.items():
        out[key] = min(entries[k] for k, (r, t, w) in parsed.items() if r == rows and t >= tokens and w >= width)
    return out


@torch.no_grad()
def measure_latency_table(model, workload: Workload, groups: dict[str, list[int]], channels: dict[str, list[int]],
                          token_keeps: list[float], dense_seconds: float, model_hash: str,
                          repeats: int = 5) -> LatencyTable:
    """Measure every (width, tokens) entry a search can ask for.

    `groups` / `channels`: {block path: the kept KV-group / channel counts its choices give}; `token_keeps`: the
    visual-token keep ratios (1.0 or none: no pruning); `dense_seconds`: the measured dense prefill of the workload
    (sets `rest`)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise LatencyTableError(f"latency repeats is {repeats!r}; expected an integer >= 1")
    with gc_paused():  # one collection for the whole table, not one per entry
        return _measure_table(model, workload, groups, channels, token_keeps, dense_seconds, model_hash, repeats)


def _measure_table(model, workload, groups, channels, token_keeps, dense_seconds, model_hash, repeats):
    geometry = decoder_geometry(model)
    device = model_device(model)
    table = LatencyTable(describe_device(device), model_hash, str(next(model.parameters()).dtype).replace("torch.", ""),
                         attention_implementation(model), workload, [_signature(g) for g in geometry.values()],
                         repeats=repeats, torch_version=torch.__version__)
    token_counts = {(rows, workload.tokens_after(length, keep))
                    for rows, length in workload.shapes for keep in [None, *token_keeps]}
    was_training = model.training
    model.eval()
    try:
        done: set[str] = set()
        for path, g in geometry.items():
            sig = _signature(g)
            if sig in done:
                continue
            done.add(sig)
            block = model.get_submodule(path)
            attn_widths = sorted(set(groups.get(path, [])) | {g.kv_heads})
            mlp_widths = sorted(set(channels.get(path, [])) | {g.intermediate})
            table.attn[sig], table.mlp[sig] = {}, {}
            inputs = {rt: _block_inputs(model, g.index, rt[0], rt[1], workload.padded) for rt in sorted(token_counts)}
            for width in attn_widths:
                part = copy.deepcopy(block)
                shrink_block(part, g, groups=torch.arange(width))
                for (rows, tokens), (hidden, pos, mask, position_ids) in inputs.items():
                    def attn_half(part=part, hidden=hidden, pos=pos, mask=mask, position_ids=position_ids):
                        h, _ = part.self_attn(hidden_states=part.input_layernorm(hidden), attention_mask=mask,
                                              position_embeddings=pos, position_ids=position_ids)
                        return hidden + h

                    table.attn[sig][_key(rows, tokens, width)] = _time(attn_half, device, repeats)
                del part
            for width in mlp_widths:
                part = copy.deepcopy(block)
                shrink_block(part, g, channels=torch.arange(width))
                for (rows, tokens), (hidden, _, _, _) in inputs.items():
                    def mlp_half(part=part, hidden=hidden):
                        return hidden + part.mlp(part.post_attention_layernorm(hidden))

                    table.mlp[sig][_key(rows, tokens, width)] = _time(mlp_half, device, repeats)
                del part
    finally:
        model.train(was_training)
    table.raw_attn, table.raw_mlp = copy.deepcopy(table.attn), copy.deepcopy(table.mlp)
    table.attn = {sig: monotone(e) for sig, e in table.attn.items()}
    table.mlp = {sig: monotone(e) for sig, e in table.mlp.items()}
    table.dense = float(dense_seconds)
    table.rest = max(table.dense - table.blocks([(g.kv_heads, g.intermediate) for g in geometry.values()]), 0.0)
    return table

