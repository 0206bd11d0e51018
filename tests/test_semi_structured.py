"""2:4 export: pattern checks and the refusal on machines without semi-structured kernels (the GPU path itself is
measured by experiments/bench_speed.py on CUDA)."""
import copy

import pytest
import torch

from efficientllava.pruning import prune_model
from efficientllava.pruning.semi_structured import (SemiStructuredError, SemiStructuredUnavailable, availability,
                                                    export_semi_structured, two_four_violation)
from efficientllava.pruning.toy_calibration import toy_model_and_batches

LAYER = "model.language_model.layers.0.mlp.up_proj"


def test_two_four_violations_are_found_and_named():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert two_four_violation(w) is None
    w[0, 1] = 5.0
    assert two_four_violation(w) == "row 0, inputs 0..3 hold 3 nonzeros"
    assert two_four_violation(torch.ones(2, 6)) == "6 input features, not a multiple of 4"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_export_checks_the_pattern_then_refuses_without_cuda():
    model, _, _ = toy_model_and_batches(seed=0, n=8, batch_size=4)
    model = copy.deepcopy(model)
    with pytest.raises(SemiStructuredError, match=f"layer '{LAYER}' is not 2:4 sparse"):
        export_semi_structured(model, [LAYER], tokens=64)
    prune_model(model, {LAYER: "2:4"}, "magnitude")
    before = model.get_submodule(LAYER).weight.clone()
    with pytest.raises(SemiStructuredUnavailable, match="need a CUDA GPU; the model is on cpu; nothing was swapped"):
        export_semi_structured(model, [LAYER], tokens=64)
    assert torch.equal(model.get_submodule(LAYER).weight, before)
    assert availability(torch.device("cpu")).startswith("semi-structured sparse kernels need a CUDA GPU")
    with pytest.raises(SemiStructuredError, match="tokens is 0"):
        export_semi_structured(model, [LAYER], tokens=0)
