"""Visual-token pruning (FastV, Chen et al. 2024): after decoder layer K, keep only the fraction R of the image tokens
that receive the most attention from the last text token.

LLaVA-1.5 feeds 576 image tokens of its ~650 prefill tokens, so dropping image tokens from layer K on shrinks most of
the prefill work of the later layers. With L decoder layers:
- layers 0..K-1 see every token; the attention probabilities of layer K-1, from each row's last real token (its query)
  to every earlier token (softmax over the row, averaged over the heads), rank the image tokens (read from what
  eager attention returns; recomputed from layer K-1's queries and keys for kernels that return none, such as sdpa);
- the round(R * n_image) best-ranked image tokens (at least one) and every text token go on to layers K..L-1, which
  keep their original rotary positions; the others are dropped (also from those layers' KV cache);
- the language model's output is scattered back to the full length (dropped positions hold zeros), so everything
  downstream (letter scoring at the last position, LM head, generation) works unchanged.
K is in [1, L-1] (K = L would prune nothing); R is in (0, 1] (R = 1 keeps every token: no pruning).

It is a runtime behaviour, not weights: `VisualTokenPruner(model, K, R).attach()` installs forward hooks, records
{"layer": K, "keep": R} in `config.efficientllava_tokens` (so `save_pretrained` writes it) and
`attach_from_config(model)` re-installs it after loading (`efficientllava.models.load_llava` does this). Decoding
after a pruned prefill works: the attention mask of layers >= K is cut to the tokens those layers cached.
Supported: Llama-style attention (q_proj / k_proj, rotary embeddings) with the sdpa or eager attention mask (none, or
a 4-D tensor) or a 2-D padding mask; every row must hold the same number of image tokens (one image per row).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from efficientllava.models import cache_in
from efficientllava.pruning.structured import block_paths

CONFIG_KEY = "efficientllava_tokens"


class TokenPruningError(ValueError):
    """A visual-token pruning setting or input that cannot work."""


def check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < float(keep) <= 1:
        raise TokenPruningError(f"visual-token keep ratio R is {keep!r}, outside (0, 1]; expected the fraction of "
                                "image tokens kept after layer K, e.g. 0.5 (1.0 keeps all)")
    return float(keep)


def check_layer(layer, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n_layers - 1:
        raise TokenPruningError(f"visual-token pruning after layer K={layer!r}, but the language model has {n_layers} "
                                f"decoder layers; expected an integer K in [1, {n_layers - 1}] (layers 0..K-1 see "
                                "every token)")
    return layer


def image_token_id(model: nn.Module) -> int:
    """The token id a LLaVA's prompts hold where the image goes."""
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    if token is None:
        raise TokenPruningError("the model's config has no image_token_id; expected a LLaVA")
    return int(token)


def kept_count(n_image: int, keep: float) -> int:
    """Image tokens kept of `n_image` at ratio `keep` (at least one)."""
    return max(1, min(n_image, int(round(keep * n_image))))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _flat_rows(index: torch.Tensor, length: int) -> torch.Tensor:
    """A (batch, n) index of positions in rows of `length` as row numbers of the (batch * length)-row flattening."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * length).reshape(-1)


def _gather(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """t gathered along `dim` by a (batch, n) index (t's batch dim may be 1: broadcast first). Done as one
    index_select of whole rows of the flattened tensor: on a CPU, several times faster than `Tensor.gather`."""
    b, n = index.shape
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    moved = t.movedim(dim, 1)
    length, rest = moved.shape[1], moved.shape[2:]
    return moved.reshape(b * length, -1).index_select(0, _flat_rows(index, length)).view(b, n, *rest).movedim(1, dim)


class VisualTokenPruner:
    def __init__(self, model: nn.Module, layer: int, keep: float):
        self.model = model
        paths = block_paths(model)
        self.layers = [model.get_submodule(p) for p in paths]
        self.language_model = model.get_submodule(paths[0].rsplit(".", 2)[0])
        inner = getattr(model, "model", None)  # LlavaModel: receives input_ids (also when called directly)
        self.llava = inner if isinstance(inner, nn.Module) and hasattr(inner, "language_model") else model
        self.image_token = image_token_id(model)
        for i, block in enumerate(self.layers):
            attn = getattr(block, "self_attn", None)
            if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj")):
                raise TokenPruningError(f"decoder layer {i} has no self_attn.q_proj / k_proj; visual-token pruning "
                                        "expects Llama-style attention")
        self.layer, self.keep = check_layer(layer, len(self.layers)), check_keep(keep)
        self.handles: list = []
        self.forward_state: dict | None = None  # this forward's plan
        self.prefill: dict | None = None  # what the last pruned prefill kept (for decoding after it)

    # ---- settings -----------------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def set(self, layer: int, keep: float) -> None:
        layer, keep = check_layer(layer, len(self.layers)), check_keep(keep)
        was = self.attached
        if was and layer != self.layer:
            self.detach()
        self.layer, self.keep = layer, keep
        if was and not self.attached:
            self.attach()
        elif was:
            setattr(self.model.config, CONFIG_KEY, self.settings())

    def settings(self) -> dict:
        return {"layer": self.layer, "keep": self.keep}

    def attach(self) -> "VisualTokenPruner":
        if self.attached:
            return self
        if getattr(self.model, "_efficientllava_token_pruner", None) not in (None, self):
            raise TokenPruningError("another VisualTokenPruner is attached to this model; detach it first")
        self.handles = [
            self.llava.register_forward_pre_hook(self._on_model, with_kwargs=True),
            self.layers[self.layer - 1].self_attn.register_forward_hook(self._on_scores, with_kwargs=True),
            self.language_model.register_forward_hook(self._on_output),
        ]
        self.handles += [self.layers[j].register_forward_pre_hook(self._on_layer(j), with_kwargs=True)
                         for j in range(self.layer, len(self.layers))]
        self.model._efficientllava_token_pruner = self
        setattr(self.model.config, CONFIG_KEY, self.settings())
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.forward_state, self.prefill = [], None, None
        if getattr(self.model, "_efficientllava_token_pruner", None) is self:
            del self.model._efficientllava_token_pruner
        if hasattr(self.model.config, CONFIG_KEY):
            delattr(self.model.config, CONFIG_KEY)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # ---- hooks --------------------------------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise TokenPruningError("visual-token pruning needs input_ids to find the image tokens; the model was "
                                    "called with inputs_embeds only")
        past = cache_in(kwargs)
        seen = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        self.forward_state = self.plan(ids, kwargs.get("attention_mask"), seen)
        return None

    def plan(self, ids: torch.Tensor, mask2d: torch.Tensor | None = None, seen: int = 0) -> dict | None:
        """What the next forward over `ids` does (None: nothing). It reads token counts from the device, so a
        caller that captures the forward as a CUDA graph plans first and sets `forward_state` to a fresh copy of
        the plan before each captured or eager run (`speed.lean_prefill` does)."""
        image = ids == self.image_token
        counts = image.sum(1)
        if int(counts.max()) == 0:  # no image: a decoding step after a pruned prefill, or a text-only call
            if self.prefill is not None and seen >= self.prefill["length"]:
                return {"mode": "decode"}
            self.prefill = None
            return None
        if int(counts.min()) != int(counts.max()):
            raise TokenPruningError(f"the batch's rows hold {sorted(set(counts.tolist()))} image tokens; visual-token "
                                    "pruning expects the same number in every row (one image per row)")
        if seen:
            raise TokenPruningError("image tokens arrived after a cache was filled; visual-token pruning prunes the "
                                    "image at prefill and expects it in the first call")
        n_image = int(counts[0])
        n_keep = kept_count(n_image, self.keep)
        self.prefill = None
        if n_keep >= n_image:
            return None
        length = ids.shape[1]
        if mask2d is not None:
            positions = torch.arange(length, device=ids.device)
            last = (mask2d.to(ids.device).long() * (positions + 1)).argmax(1)
        else:
            last = torch.full((ids.shape[0],), length - 1, device=ids.device)
        return {"mode": "prefill", "image": image, "mask2d": mask2d, "last": last, "length": length,
                "n_keep": n_keep, "n_kept": length - n_image + n_keep, "kept": None, "kwargs": None}

    @torch.no_grad()
    def _on_scores(self, attn, args, kwargs, output):
        state = self.forward_state
        if state is None or state["mode"] != "prefill":
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b, s, _ = hidden.shape
        rows = torch.arange(b, device=hidden.device)
        last = state["last"].to(hidden.device)
        weights = self._attention_weights(attn, output, b, s)
        if weights is not None:  # eager attention computed them already: read the last token's row
            received = weights[rows, :, last].float().mean(1)
        else:
            received = self._recompute_received(attn, hidden, kwargs["position_embeddings"], state, rows, last)
        image = state["image"].to(hidden.device)
        chosen = received.masked_fill(~image, float("-inf")).topk(state["n_keep"], dim=1).indices
        keep = (~image).scatter(1, chosen, True)
        positions = torch.arange(s, device=hidden.device)
        # the kept positions in ascending order, without reading the device (a CUDA graph can capture this): every
        # row keeps the same count, and kept positions outrank dropped ones, earlier before later
        order = keep.long() * (2 * s) + (s - 1 - positions)
        state["kept"] = order.topk(state["n_kept"], dim=1).indices
        return None

    @staticmethod
    def _attention_weights(attn, output, b: int, s: int) -> torch.Tensor | None:
        """Layer K-1's attention probabilities (b, heads, s, s), when its kernels returned them (eager attention
        does; sdpa and flash kernels return None)."""
        config = getattr(attn, "config", None)
        if getattr(config, "_attn_implementation", None) != "eager" or not isinstance(output, tuple) or len(output) < 2:
            return None
        weights = output[1]
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or weights.shape[0] != b \
                or weights.shape[-2:] != (s, s):
            return None
        return weights

    @staticmethod
    def _recompute_received(attn, hidden, position_embeddings, state: dict, rows, last) -> torch.Tensor:
        """The attention each token receives from its row's last token, averaged over heads (b, s), recomputed from
        layer K-1's input for kernels that do not return attention probabilities."""
        cos, sin = position_embeddings
        b, s, _ = hidden.shape
        d = attn.head_dim
        q = attn.q_proj(hidden[rows, last]).view(b, -1, d)  # (b, heads, d)
        k = attn.k_proj(hidden).view(b, s, -1, d).transpose(1, 2)  # (b, kv, s, d)
        cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
        q = q * cos[rows, last][:, None] + rotate_half(q) * sin[rows, last][:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = torch.einsum("bhd,bhsd->bhs", q.float(), k.float()) * getattr(attn, "scaling", d ** -0.5)
        positions = torch.arange(s, device=hidden.device)
        allowed = positions[None, :] <= last[:, None]
        if state["mask2d"] is not None:
            allowed &= state["mask2d"].to(hidden.device).bool()
        logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
        return logits.softmax(-1).mean(1)

    def _on_layer(self, j: int):
        def hook(layer, args, kwargs):
            state = self.forward_state
            if state is None:
                return None
            if state["mode"] == "decode":
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                    kept, length = self.prefill["kept"].to(mask.device), self.prefill["length"]
                    cols = torch.cat([kept, torch.arange(length, mask.shape[-1], device=mask.device)
                                      .expand(kept.shape[0], -1)], dim=1)
                    kwargs = {**kwargs, "attention_mask": _gather(mask, cols, 3)}
                    return args, kwargs
                if isinstance(mask, torch.Tensor):
                    raise TokenPruningError(f"decoding after visual-token pruning got a {mask.dim()}-D attention "
                                            "mask; expected none or a 4-D one (sdpa or eager attention)")
                return None
            if state["kept"] is None:
                raise TokenPruningError(f"layer {j} ran before layer {self.layer - 1} ranked the image tokens")
            if state["kwargs"] is None:
                state["kwargs"] = self._pruned_kwargs(kwargs, state["kept"])
                self.prefill = {"kept": state["kept"], "length": state["length"]}
            new_kwargs = {**kwargs, **state["kwargs"]}
            if j == self.layer:
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = _gather(hidden, state["kept"].to(hidden.device), 1)
                if args:
                    args = (hidden, *args[1:])
                else:
                    new_kwargs["hidden_states"] = hidden
            return args, new_kwargs
        return hook

    def _pruned_kwargs(self, kwargs: dict, kept: torch.Tensor) -> dict:
        out = {}
        if kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            out["position_embeddings"] = (_gather(cos, kept.to(cos.device), 1), _gather(sin, kept.to(sin.device), 1))
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            out["position_ids"] = _gather(kwargs["position_ids"], kept.to(kwargs["position_ids"].device), 1)
        if isinstance(kwargs.get("cache_position"), torch.Tensor):
            out["cache_position"] = torch.arange(kept.shape[1], device=kwargs["cache_position"].device)
        mask = kwargs.get("attention_mask")
        if mask is None:
            out["attention_mask"] = None
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            k = kept.to(mask.device)
            out["attention_mask"] = _gather(_gather(mask, k, 2), k, 3)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            out["attention_mask"] = _gather(mask, kept.to(mask.device), 1)
        else:
            raise TokenPruningError(f"visual-token pruning got an attention mask of type {type(mask).__name__}; "
                                    "expected none, a 4-D tensor (sdpa/eager) or a 2-D padding mask")
        return out

    def _on_output(self, module, args, output):
        state = self.forward_state
        if state is None or state["mode"] != "prefill" or state["kept"] is None:
            return None
        hidden = output.last_hidden_state
        b, _, width = hidden.shape
        length = state["length"]
        flat = _flat_rows(state["kept"].to(hidden.device), length)
        full = hidden.new_zeros(b * length, width).index_copy_(0, flat, hidden.reshape(-1, width))
        output.last_hidden_state = full.view(b, length, width)
        self.forward_state = None
        return output


def attach_from_config(model: nn.Module) -> VisualTokenPruner | None:
    """Re-install the visual-token pruning recorded in the model's config (None when there is none)."""
    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        return None
    if not isinstance(settings, dict) or set(settings) != {"layer", "keep"}:
        raise TokenPruningError(f"config.{CONFIG_KEY} is {settings!r}; expected {{'layer': K, 'keep': R}}")
    return VisualTokenPruner(model, settings["layer"], settings["keep"]).attach()


def token_pruner(model: nn.Module) -> VisualTokenPruner | None:
    """The pruner attached to `model`, if any."""
    return getattr(model, "_efficientllava_token_pruner", None)
