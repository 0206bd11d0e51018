"""The model-too-large check (before any weight is read), parameter counts from a config, and random weights at a
checkpoint's shape (timing runs)."""
import pytest
import torch

from efficientllava import models
from efficientllava.models import ModelTooLargeError, check_fits, load_llava, parameter_count


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from efficientllava.toy_model import build_toy_llava

    path = tmp_path_factory.mktemp("toy")
    model, processor = build_toy_llava(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_parameter_count_from_the_config_equals_the_model(toy_dir):
    model, _ = load_llava(toy_dir, device="cpu")
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_too_large_names_both_sizes(monkeypatch):
    monkeypatch.setattr(models, "free_memory", lambda device: 8 * 2**30)
    n = 7_063_427_072
    with pytest.raises(ModelTooLargeError, match=rf"'llava-7b' has 7.06B parameters: its weights need "
                                                 rf"{n * 2 / 2**30:.1f} GiB in bfloat16, but cpu has 8.0 GiB free; "
                                                 "expected a device with more free memory"):
        check_fits("llava-7b", n, torch.bfloat16, torch.device("cpu"))
    check_fits("llava-7b", n // 4, torch.bfloat16, torch.device("cpu"))  # 3.3 GiB fits in 8


def test_load_refuses_before_reading_weights(toy_dir, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the size check")

    monkeypatch.setattr(models, "free_memory", lambda device: 1024)
    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", no_weights)
    with pytest.raises(ModelTooLargeError, match=r"but cpu has 0.0 GiB free"):
        load_llava(toy_dir, device="cpu")
    monkeypatch.undo()
    assert load_llava(toy_dir, device="cpu", check_memory=True)[0] is not None  # the real free memory suffices


def test_free_memory_of_the_host_is_known():
    free = models.free_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_random_init_keeps_the_shapes_and_not_the_weights(toy_dir):
    saved, _ = load_llava(toy_dir, device="cpu")
    one, processor = load_llava(toy_dir, device="cpu", random_init=True, seed=1)
    two, _ = load_llava(toy_dir, device="cpu", random_init=True, seed=1)
    shapes = {n: p.shape for n, p in saved.named_parameters()}
    assert {n: p.shape for n, p in one.named_parameters()} == shapes
    weight = "model.language_model.layers.0.mlp.up_proj.weight"
    named = dict(one.named_parameters())
    assert not torch.equal(named[weight], dict(saved.named_parameters())[weight])
    assert torch.equal(named[weight], dict(two.named_parameters())[weight])  # seeded
    assert processor.tokenizer is not None
