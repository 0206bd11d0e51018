"""Visual-token pruning (FastV): the kept tokens and the outputs equal an independent reference, decoding after a
pruned prefill matches it too, and every bad setting or input is refused."""
import copy

import pytest
import torch

from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.models import cache_in
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from efficientllava.toy_model import IMAGE
from efficientllava.token_pruning import TokenPruningError, VisualTokenPruner, attach_from_config, kept_count

K, KEEP = 2, 0.5


@pytest.fixture(scope="module")
def toy_and_batches():
    model, processor, batches = toy_model_and_batches(seed=0, n=8, batch_size=4)
    return model, processor, [{k: b[k] for k in MODEL_INPUTS} for b in batches]


def reference_keep(model, batch, layer: int, keep: float) -> torch.Tensor:
    """The FastV choice from eager attention weights: (rows, seq) bool, True for kept positions."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions[layer - 1]  # (b, heads, s, s)
    rows = torch.arange(batch["input_ids"].shape[0])
    last = batch["attention_mask"].sum(1) - 1  # right padding
    received = attentions[rows, :, last].mean(1)
    image = batch["input_ids"] == IMAGE
    n = kept_count(int(image[0].sum()), keep)
    chosen = received.masked_fill(~image, -1.0).topk(n, dim=1).indices
    keep_mask = ~image
    keep_mask[rows[:, None], chosen] = True
    return keep_mask


def key_masking_hooks(model, keep_mask: torch.Tensor, layer: int):
    """Layers >= `layer` may not attend to dropped positions: the same computation as dropping them."""
    length = keep_mask.shape[1]

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        hidden = args[0]
        if mask is None:  # sdpa without padding: build the causal mask it stands for
            own = module.self_attn.layer_idx  # this layer's cache, not yet holding the current token
            seen = cache_in(kwargs).get_seq_length(own) if hidden.shape[1] == 1 else 0
            q, total = hidden.shape[1], seen + hidden.shape[1]
            mask = torch.ones(hidden.shape[0], 1, q, total, dtype=torch.bool).tril(total - q)
        mask = mask.clone()
        if mask.dtype == torch.bool:
            mask[..., :length] &= keep_mask[:, None, None, :]
        else:  # eager attention: an additive float mask
            dropped = ~keep_mask[:, None, None, :]
            mask[..., :length] = mask[..., :length].masked_fill(dropped, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    layers = model.model.language_model.layers
    return [layers[j].register_forward_pre_hook(hook, with_kwargs=True) for j in range(layer, len(layers))]


def test_keep_one_changes_nothing(toy_and_batches):
    model, _, batches = toy_and_batches
    with torch.no_grad():
        dense = model(**batches[0]).logits
        with VisualTokenPruner(model, K, 1.0):
            same = model(**batches[0]).logits
    assert torch.equal(dense, same)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefill_keeps_the_fastv_tokens_and_equals_the_key_masked_model(toy_and_batches, attention, monkeypatch):
    model, _, batches = toy_and_batches
    batch = batches[0]
    model = copy.deepcopy(model)
    model.set_attn_implementation(attention)
    recomputed = []
    recompute = VisualTokenPruner._recompute_received
    monkeypatch.setattr(VisualTokenPruner, "_recompute_received",
                        staticmethod(lambda *a: recomputed.append(1) or recompute(*a)))
    expected = reference_keep(model, batch, K, KEEP)
    rows = torch.arange(4)
    last = batch["attention_mask"].sum(1) - 1
    with torch.no_grad():
        with VisualTokenPruner(model, K, KEEP) as pruner:
            pruned = model(**batch).logits
            kept = pruner.prefill["kept"]
        assert torch.equal(kept, expected.nonzero()[:, 1].view(4, -1))
        assert kept.shape[1] == batch["input_ids"].shape[1] - 16 + kept_count(16, KEEP)
        handles = key_masking_hooks(model, expected, K)
        reference = model(**batch).logits
        for h in handles:
            h.remove()
        dense = model(**batch).logits
    assert torch.allclose(pruned[rows, last], reference[rows, last], atol=1e-5)
    assert not torch.allclose(pruned[rows, last], dense[rows, last], atol=1e-3)
    assert pruned.shape == dense.shape  # scattered back to full length
    # eager attention hands its probabilities over: the ranking reads them instead of recomputing layer K-1's keys
    assert recomputed == ([1] if attention == "sdpa" else [])


def test_decoding_after_a_pruned_prefill_matches_the_reference(toy_and_batches):
    model, _, batches = toy_and_batches
    batch = {k: v[:1] for k, v in batches[0].items()}
    batch = {**batch, "input_ids": batch["input_ids"][:, :int(batch["attention_mask"].sum())],
             "attention_mask": batch["attention_mask"][:, :int(batch["attention_mask"].sum())]}
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=0)
    with VisualTokenPruner(model, 1, 0.25):
        out = model.generate(**batch, **options)
    handles = key_masking_hooks(model, reference_keep(model, batch, 1, 0.25), 1)
    try:
        ref = model.generate(**batch, **options)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) < 1e-4


def test_settings_travel_in_the_config_and_come_back(toy_and_batches):
    model = copy.deepcopy(toy_and_batches[0])
    pruner = VisualTokenPruner(model, 3, 0.75).attach()
    assert model.config.efficientllava_tokens == {"layer": 3, "keep": 0.75}
    pruner.set(1, 0.5)
    assert model.config.efficientllava_tokens == {"layer": 1, "keep": 0.5}
    pruner.detach()
    assert not hasattr(model.config, "efficientllava_tokens")
    model.config.efficientllava_tokens = {"layer": 2, "keep": 0.25}
    again = attach_from_config(model)
    assert (again.layer, again.keep, again.attached) == (2, 0.25, True)
    again.detach()


@pytest.mark.parametrize("layer, keep, match", [
    (2, 0.0, r"keep ratio R is 0.0, outside \(0, 1\]"),
    (2, 1.5, r"keep ratio R is 1.5, outside \(0, 1\]"),
    (4, 0.5, r"K=4, but the language model has 4 decoder layers; expected an integer K in \[1, 3\]"),
    (0, 0.5, r"K=0.*expected an integer K in \[1, 3\]"),
])
def test_bad_settings_are_refused(toy_and_batches, layer, keep, match):
    with pytest.raises(TokenPruningError, match=match):
        VisualTokenPruner(toy_and_batches[0], layer, keep)


def test_bad_inputs_are_refused(toy_and_batches):
    model, _, batches = toy_and_batches
    batch = dict(batches[0])
    with VisualTokenPruner(model, K, KEEP):
        ids = batch["input_ids"].clone()
        ids[0, (ids[0] == IMAGE).nonzero()[0]] = 5  # one image token fewer in row 0
        with pytest.raises(TokenPruningError, match=r"rows hold \[15, 16\] image tokens"):
            model(**{**batch, "input_ids": ids})
        embeds = model.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(TokenPruningError, match="needs input_ids"):
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
