"""The pruning bank: assembling a policy equals one-shot pruning; restore; masks and disk modes; memory cost."""
import pytest
import torch

from efficientllava.pruning.apply import prune_model
from efficientllava.pruning.bank import PruningBank, pack_mask, unpack_mask
from efficientllava.pruning.layers import get_linear, select_layers
from efficientllava.pruning.toy_calibration import toy_model_and_batches

CHOICES = [0.0, 0.2, 0.5, 0.7, "2:4"]


def some_layers(model):
    return list(select_layers(model, include=["*.layers.0.*", "*.layers.2.*"]))


def a_policy(names):
    return {name: CHOICES[i % len(CHOICES)] for i, name in enumerate(names)}


def dense(model, names):
    return {n: get_linear(model, n).weight.detach().clone() for n in names}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_assemble_equals_one_shot_pruning_and_restore(method):
    model, _, batches = toy_model_and_batches()
    names = some_layers(model)
    before = dense(model, names)
    bank = PruningBank.build(model, names, CHOICES, method, batches)
    assert all(torch.equal(get_linear(model, n).weight, before[n]) for n in names)  # building changes nothing
    policy = a_policy(names)
    bank.assemble(model, policy)
    reference, _, _ = toy_model_and_batches()
    prune_model(reference, policy, method, batches, sequential=False)
    for name in names:
        torch.testing.assert_close(get_linear(model, name).weight, get_linear(reference, name).weight,
                                   rtol=0, atol=1e-6)
    bank.assemble(model, {names[0]: 0.7})  # a second policy: layers it does not name go back to dense
    assert torch.equal(get_linear(model, names[1]).weight, before[names[1]])
    assert (get_linear(model, names[0]).weight == 0).float().mean() == pytest.approx(0.7, abs=0.01)
    bank.restore(model)
    assert all(torch.equal(get_linear(model, n).weight, before[n]) for n in names)


def test_mask_mode_is_exact_for_wanda_and_smaller():
    model, _, batches = toy_model_and_batches()
    names = some_layers(model)
    weights = PruningBank.build(model, names, CHOICES, "wanda", batches)
    masks = PruningBank.build(model, names, CHOICES, "wanda", batches, mode="masks")
    policy = a_policy(names)
    for name, choice in policy.items():
        assert torch.equal(weights.weight(name, choice), masks.weight(name, choice))
        assert torch.equal(weights.mask(name, choice), masks.mask(name, choice))
    params = sum(get_linear(model, n).weight.numel() for n in names)
    stored = len(CHOICES) - 1  # ratio 0 is the dense weight, stored once
    assert weights.nbytes() == params * 4 * (1 + stored)
    assert masks.nbytes() == params * 4 + params // 8 * stored
    assert masks.memory_report()["bytes_in_memory"] == masks.nbytes()
    beside = PruningBank.build(model, names, CHOICES, "wanda", batches, mode="masks", device="model")
    assert beside.device == get_linear(model, names[0]).weight.device
    assert all(t.device == beside.device for entry in beside.entries.values() for t in entry.values())
    assert all(torch.equal(beside.weight(n, c), masks.weight(n, c)) for n, c in policy.items())


def test_mask_mode_drops_the_sparsegpt_update():
    model, _, batches = toy_model_and_batches()
    names = some_layers(model)[:1]
    weights = PruningBank.build(model, names, [0.5], "sparsegpt", batches)
    masks = PruningBank.build(model, names, [0.5], "sparsegpt", batches, mode="masks")
    assert torch.equal(weights.mask(names[0], 0.5), masks.mask(names[0], 0.5))
    assert not torch.equal(weights.weight(names[0], 0.5), masks.weight(names[0], 0.5))
    w = get_linear(model, names[0]).weight
    assert torch.equal(masks.weight(names[0], 0.5), w * masks.mask(names[0], 0.5))


def test_disk_bank_equals_memory_bank(tmp_path):
    model, _, batches = toy_model_and_batches()
    names = some_layers(model)
    memory = PruningBank.build(model, names, CHOICES, "sparsegpt", batches)
    PruningBank.build(model, names, CHOICES, "sparsegpt", batches, directory=tmp_path / "bank")
    disk = PruningBank.open(tmp_path / "bank")
    assert disk.nbytes() == 0 and disk.disk_bytes() > memory.nbytes() * 0.9
    other, _, _ = toy_model_and_batches()
    policy = a_policy(names)
    memory.assemble(model, policy)
    disk.assemble(other, policy)
    for name in names:
        assert torch.equal(get_linear(model, name).weight, get_linear(other, name).weight)


def test_bank_errors():
    model, _, batches = toy_model_and_batches()
    names = some_layers(model)[:2]
    bank = PruningBank.build(model, names, [0.5], "magnitude")
    with pytest.raises(KeyError, match=r"choice '0.3', which the bank does not hold; expected one of \['0.5'\]"):
        bank.assemble(model, {names[0]: 0.3})
    with pytest.raises(KeyError, match="'lm_head' is not in the bank"):
        bank.assemble(model, {"lm_head": 0.5})
    with pytest.raises(ValueError, match=r"ratios must be in \[0, 1\)"):
        bank.assemble(model, {names[0]: 1.5})
    with pytest.raises(ValueError, match="not a multiple of M=7"):
        PruningBank.build(model, names, ["3:7"], "magnitude")
    with pytest.raises(ValueError, match="bank mode 'bits' is unknown"):
        PruningBank.build(model, names, [0.5], "magnitude", mode="bits")
    with pytest.raises(ValueError, match="calibration set is empty"):
        PruningBank.build(model, names, [0.5], "wanda", [])


def test_pack_unpack_masks():
    mask = torch.rand(5, 13) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), 13), mask)
    assert pack_mask(mask).shape == (5, 2)
