import json

import pytest
import torch

from efficientllava.models import TOY_MODEL_DIR, ModelLoadError, load_llava


def test_toy_loads_through_the_same_loader_as_a_hub_id(toy):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, processor = toy
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 5e5 < n_params < 6e6
    assert (TOY_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20


def test_dtype_from_config():
    model, _ = load_llava(TOY_MODEL_DIR, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist; expected a local LLaVA checkpoint directory"):
        load_llava("/no/such/dir")


def test_not_a_llava_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="type 'bert'; expected a LLaVA checkpoint"):
        load_llava(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_llava(tmp_path)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not load a LLaVA from 'no-such-org/no-such-llava'"):
        load_llava("no-such-org/no-such-llava", local_files_only=True)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_llava(TOY_MODEL_DIR, dtype="float8")


def test_attention_implementation_from_config_gives_the_same_logits():
    from omegaconf import OmegaConf
    from PIL import Image

    from efficientllava.models import load_from_config

    node = {"path": str(TOY_MODEL_DIR), "device": "cpu"}
    default, processor = load_from_config(OmegaConf.create(node))
    eager, _ = load_from_config(OmegaConf.create({**node, "attn_implementation": "eager"}))
    assert {eager.config.text_config._attn_implementation, eager.config.vision_config._attn_implementation} == {"eager"}
    assert default.config.text_config._attn_implementation != "eager"
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    texts = ["USER: What color is the square? <image> ASSISTANT:", "USER: Where is the cross? <image> ASSISTANT:"]
    batch = processor(text=texts, images=[image, image], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = default(**batch).logits, eager(**batch).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_unknown_attention_implementation():
    with pytest.raises(ModelLoadError, match="attention implementation 'nonsense' is not available .*expected one"):
        load_llava(TOY_MODEL_DIR, device="cpu", attn_implementation="nonsense")


def test_cache_argument_is_the_name_this_transformers_takes(toy):
    import inspect
    import warnings

    from efficientllava.models import cache_argument

    model = toy[0]
    for module in (model, model.model, model.model.language_model):
        assert cache_argument(module) in inspect.signature(module.forward).parameters
    language_model = model.model.language_model
    cache = language_model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the old name warns from transformers 5.24 on
        out = language_model(input_ids=torch.tensor([[4]]), use_cache=True, **{cache_argument(language_model): cache})
    assert out.last_hidden_state.shape[1] == 1 and cache.get_seq_length() == 4


def _image_batch(processor, n=2):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(n)]
    texts = ["USER: What color is the square? <image> ASSISTANT:", "USER: Where is the cross? <image> ASSISTANT:"]
    return processor(text=texts[:n], images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("feature_layer, kept", [(-2, 2), (1, 1)])
def test_trimmed_vision_tower_gives_the_same_logits_and_saves_as_an_ordinary_llava(feature_layer, kept, tmp_path):
    from efficientllava.models import trim_vision_tower_layers

    full, processor = load_llava(TOY_MODEL_DIR, device="cpu")
    full.config.vision_feature_layer = feature_layer
    trimmed = load_llava(TOY_MODEL_DIR, device="cpu")[0]
    trimmed.config.vision_feature_layer = feature_layer
    assert trim_vision_tower_layers(trimmed) == 3 - kept
    assert len(trimmed.model.vision_tower.encoder.layers) == kept == trimmed.config.vision_config.num_hidden_layers
    batch = _image_batch(processor)
    with torch.no_grad():
        expected = full(**batch).logits
        assert torch.equal(trimmed(**batch).logits, expected)
        trimmed.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
        back = load_llava(tmp_path, device="cpu")[0]
        assert torch.equal(back(**batch).logits, expected)
    assert len(back.model.vision_tower.encoder.layers) == kept
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in full.parameters())


def test_trim_keeps_every_feature_layer_of_a_list():
    from efficientllava.models import trim_vision_tower_layers

    full, processor = load_llava(TOY_MODEL_DIR, device="cpu")
    trimmed = load_llava(TOY_MODEL_DIR, device="cpu")[0]
    trimmed.config.vision_feature_layer = [-3, -2]
    assert trim_vision_tower_layers(trimmed) == 1
    assert trimmed.config.vision_feature_layer == [1, 2]
    pixels = _image_batch(processor)["pixel_values"]
    with torch.no_grad():
        a = full.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        b = trimmed.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(a) == 4 and len(b) == 3
    assert all(torch.equal(a[i], b[j]) for i, j in [(-3, 1), (-2, 2)])


def test_trim_from_config_and_nothing_to_trim():
    from omegaconf import OmegaConf

    from efficientllava.models import load_from_config, trim_vision_tower_layers

    trimmed, _ = load_from_config(OmegaConf.create({"path": str(TOY_MODEL_DIR), "device": "cpu",
                                                    "trim_vision_tower": True}))
    assert len(trimmed.model.vision_tower.encoder.layers) == 2  # the toy reads layer -2 of 3
    assert trim_vision_tower_layers(trimmed) == 0  # its last layer is read now: nothing more goes
    full, _ = load_llava(TOY_MODEL_DIR, device="cpu")
    full.config.vision_feature_layer = -1
    assert trim_vision_tower_layers(full) == 0 and len(full.model.vision_tower.encoder.layers) == 3


def test_trim_refuses_a_feature_layer_the_tower_does_not_have():
    from efficientllava.models import trim_vision_tower_layers

    model, _ = load_llava(TOY_MODEL_DIR, device="cpu")
    model.config.vision_feature_layer = -5
    with pytest.raises(ModelLoadError, match=r"vision_feature_layer -5 is outside the vision tower's 4 hidden states"):
        trim_vision_tower_layers(model)
