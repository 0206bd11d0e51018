"""Projector rounds: only the projector trains, over the top-k assembled policies; the model ends dense."""
import pytest
import torch

from efficientllava.data.collate import Collator
from efficientllava.projector import (
    ProjectorTuner,
    answer_loss,
    check_loss,
    load_projector,
    projector_module,
    round_loss,
    save_projector,
    train_projector,
    with_teacher,
)
from efficientllava.pruning import PruningBank, select_layers
from efficientllava.pruning.toy_calibration import toy_model_and_batches, toy_records


@pytest.fixture(scope="module")
def setup():
    model, processor, batches = toy_model_and_batches()
    names = list(select_layers(model))
    bank = PruningBank.build(model, names, [0.0, 0.5, 0.7], "wanda", batches)
    records = toy_records(8, "val")
    loss_batches = [Collator(processor).answers(records, ["letter"] * len(records))]
    policies = [{n: 0.5 for n in names}, {n: 0.7 for n in names}]
    return model, bank, policies, loss_batches


def test_only_the_projector_trains_and_the_model_ends_dense(setup):
    model, bank, policies, batches = setup
    projector = {id(p) for p in projector_module(model).parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    losses = train_projector(model, bank, policies, batches, steps=3, lr=1e-2)
    assert len(losses) == 3 and losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if id(param) in projector:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name  # frozen, and pruned weights restored to dense
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_the_loss_averages_the_policies(setup):
    model, bank, policies, batches = setup
    tuner = ProjectorTuner(model, bank, policies, batches)
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask", "pixel_values")}
    expected = []
    with torch.no_grad():
        for policy in policies:
            bank.assemble(model, policy)
            expected.append(float(model(**inputs, labels=batches[0]["labels"]).loss))
    bank.restore(model)
    losses = train_projector(model, bank, policies, batches, steps=1, lr=0.0)
    assert losses[0] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert tuner.projector_parameters()  # the LLaVA projector is found


def test_projector_state_round_trip(setup, tmp_path):
    model, _, _, _ = setup
    path = save_projector(tmp_path / "round_1.safetensors", model)
    state = {k: v.clone() for k, v in projector_module(model).state_dict().items()}
    with torch.no_grad():
        for p in projector_module(model).parameters():
            p.add_(1.0)
    load_projector(path, model)
    for k, v in projector_module(model).state_dict().items():
        assert torch.equal(v, state[k])


def test_policies_and_batches_are_required(setup):
    model, bank, policies, batches = setup
    with pytest.raises(ValueError, match="no policies"):
        ProjectorTuner(model, bank, [], batches)
    with pytest.raises(ValueError, match="no batches"):
        ProjectorTuner(model, bank, policies, [])


def test_check_loss_is_the_answer_loss_averaged_over_policies_and_trains_nothing(setup):
    model, bank, policies, batches = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = []
    for policy in policies:
        bank.assemble(model, policy)
        with torch.no_grad():
            expected.append(float(answer_loss(model, {k: batches[0][k] for k in ("input_ids", "attention_mask",
                                                                             "pixel_values")}, batches[0]["labels"])))
    bank.restore(model)
    assert check_loss(model, bank, policies, batches) == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert expected[0] != expected[1]  # the policies differ, so the average means something
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # dense again, nothing trained


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def test_distill_pulls_the_pruned_model_to_the_dense_ones_answers(setup):
    """The distill loss is KL(dense || pruned) at the answer positions: 0 for the dense model itself, the KL
    computed by hand for a pruned one, and a round on it lowers it; the gold labels play no part."""
    model, bank, policies, batches = setup
    taught = with_teacher(model, batches)
    assert set(taught[0]) == set(batches[0]) | {"teacher"} and "teacher" not in batches[0]
    n_answer = int((batches[0]["labels"][:, 1:] != -100).sum())
    assert taught[0]["teacher"].shape == (n_answer, model.config.text_config.vocab_size)
    with torch.no_grad():
        assert float(round_loss(model, _inputs(batches[0]), taught[0])) == pytest.approx(0.0, abs=1e-6)
        bank.assemble(model, policies[1])
        logits = model(**_inputs(batches[0])).logits[:, :-1][batches[0]["labels"][:, 1:] != -100].float()
        student = torch.log_softmax(logits, -1)
        teacher = taught[0]["teacher"]
        by_hand = float((teacher.exp() * (teacher - student)).sum(-1).mean())
        assert float(round_loss(model, _inputs(batches[0]), taught[0])) == pytest.approx(by_hand, rel=1e-4)
        assert by_hand > 1e-3
        # other gold labels at the same positions: the same distill loss
        relabelled = {**taught[0], "labels": taught[0]["labels"].where(taught[0]["labels"] == -100,
                                                                      torch.zeros_like(taught[0]["labels"]))}
        assert float(round_loss(model, _inputs(batches[0]), relabelled)) == pytest.approx(by_hand, rel=1e-4)
    bank.restore(model)
    state = {k: v.clone() for k, v in projector_module(model).state_dict().items()}
    try:
        losses = train_projector(model, bank, policies, taught, steps=3, lr=1e-2)
        assert len(losses) == 3 and losses[-1] < losses[0]
    finally:
        projector_module(model).load_state_dict(state)
