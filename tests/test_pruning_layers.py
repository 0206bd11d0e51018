"""The layer registry: names, components, blocks and roles, on the toy and on synthetic LLaVA-1.5 layouts."""
import pytest
import torch.nn as nn

from efficientllava.pruning.layers import classify, decoder_blocks, find_layers, get_linear, select_layers, total_params
from efficientllava.pruning.toy_calibration import toy_model_and_batches

LM_ROLES = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


def fake_model(shapes: dict[str, tuple[int, int]], device="meta") -> nn.Module:
    """A module tree with nn.Linear(in, out) at each dotted name (out, in): stands in for a real checkpoint."""
    root = nn.Module()
    for name, (out_features, in_features) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(in_features, out_features, bias=False, device=device))
    return root


def llava15_shapes(lm: str, vision: str, projector: list[str], lm_head: str, layers=32, vision_layers=24):
    """LLaVA-1.5-7B shapes: Llama-2-7B decoder, CLIP ViT-L/14 tower, 1024 -> 4096 -> 4096 projector."""
    shapes = {}
    for i in range(vision_layers):
        for role in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{vision}.{i}.self_attn.{role}"] = (1024, 1024)
        shapes[f"{vision}.{i}.mlp.fc1"] = (4096, 1024)
        shapes[f"{vision}.{i}.mlp.fc2"] = (1024, 4096)
    shapes[projector[0]] = (4096, 1024)
    shapes[projector[1]] = (4096, 4096)
    for i in range(layers):
        for part, role in LM_ROLES:
            shape = {"gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
            shapes[f"{lm}.{i}.{part}.{role}"] = shape.get(role, (4096, 4096))
    shapes[lm_head] = (32064, 4096)
    return shapes


LAYOUTS = {
    "transformers5": dict(lm="model.language_model.layers", vision="model.vision_tower.vision_model.encoder.layers",
                          projector=["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"],
                          lm_head="lm_head"),
    "transformers4": dict(lm="language_model.model.layers", vision="vision_tower.vision_model.encoder.layers",
                          projector=["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"],
                          lm_head="language_model.lm_head"),
    "original_llava": dict(lm="model.layers", vision="model.vision_tower.vision_tower.vision_model.encoder.layers",
                           projector=["model.mm_projector.0", "model.mm_projector.2"], lm_head="lm_head"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_llava15_layouts(layout):
    spec = LAYOUTS[layout]
    registry = find_layers(fake_model(llava15_shapes(**spec)))
    lm = select_layers(registry)
    assert len(lm) == 32 * 7 and total_params(lm) == 6_476_005_376  # Llama-2-7B's decoder linears
    assert all(info.component == "language_model" for info in lm.values())
    assert spec["lm_head"] not in registry
    down = registry[f"{spec['lm']}.31.mlp.down_proj"]
    assert (down.block, down.role, down.in_features, down.out_features) == (31, "down", 11008, 4096)
    assert down.block_path == f"{spec['lm']}.31"
    vision = select_layers(registry, components=["vision_tower"])
    assert len(vision) == 24 * 6 and {i.role for i in vision.values()} == {"q", "k", "v", "out", "fc1", "fc2"}
    projector = select_layers(registry, components=["projector"])
    assert [(i.role, i.block) for i in projector.values()] == [("linear_1", None), ("linear_2", None)]
    assert decoder_blocks(lm) == [f"{spec['lm']}.{i}" for i in range(32)]


def test_toy_registry():
    model, _, _ = toy_model_and_batches()
    registry = find_layers(model)
    assert len(registry) == 3 * 6 + 2 + 4 * 7  # vision, projector, decoder; lm_head and embeddings are left out
    assert "lm_head" not in registry
    info = registry["model.language_model.layers.2.self_attn.k_proj"]
    assert (info.component, info.block, info.role, info.in_features, info.out_features) == (
        "language_model", 2, "k", 128, 64)
    assert info.params == 128 * 64
    assert registry["model.vision_tower.encoder.layers.1.mlp.fc2"].component == "vision_tower"
    assert registry["model.multi_modal_projector.linear_1"].role == "linear_1"
    for name, info in registry.items():
        layer = get_linear(model, name)
        assert layer.weight.shape == (info.out_features, info.in_features)


def test_selection_patterns():
    model, _, _ = toy_model_and_batches()
    assert len(select_layers(model)) == 28
    mlp = select_layers(model, include=["*.mlp.*"])
    assert len(mlp) == 12 and all(".mlp." in n for n in mlp)
    no_first = select_layers(model, exclude=["*.layers.0.*"])
    assert len(no_first) == 21
    assert len(select_layers(model, roles=["q", "k"])) == 8
    everything = select_layers(model, components=["vision_tower", "projector", "language_model"])
    assert len(everything) == 48
    with pytest.raises(ValueError, match="'decoder'.*expected a subset"):
        select_layers(model, components=["decoder"])


def test_never_prunable_names():
    for name in ["lm_head", "language_model.lm_head", "model.language_model.embed_tokens",
                 "model.vision_tower.embeddings.patch_embedding", "model.language_model.norm"]:
        assert classify(name) is None
    assert classify("model.language_model.layers.7.mlp.up_proj") == ("language_model", 7, "up")


def test_get_linear_errors():
    model, _, _ = toy_model_and_batches()
    with pytest.raises(KeyError, match="layers.9.mlp.up_proj"):
        get_linear(model, "model.language_model.layers.9.mlp.up_proj")
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        get_linear(model, "model.language_model.layers.0.mlp")


def test_selection_from_pruner_config():
    from pathlib import Path

    from omegaconf import OmegaConf

    from efficientllava.pruning.layers import select_from_config

    model, _, _ = toy_model_and_batches()
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "pruner" / "wanda.yaml")
    assert list(select_from_config(model, cfg.layers)) == list(select_layers(model))
    cfg.layers.components = ["vision_tower", "projector"]
    cfg.layers.exclude = ["*.fc2"]
    selected = select_from_config(model, cfg.layers)
    assert len(selected) == 3 * 5 + 2 and not any(n.endswith("fc2") for n in selected)
