import pytest
import pytorch_lightning as pl
import torch

from efficientllava.data.collate import Collator
from efficientllava.data.datamodule import BenchmarkDataModule
from efficientllava.toy_model import ToyArchitecture, build_toy_llava
from efficientllava.toy_training import (
    CELL_CLASSES,
    StagedToyTraining,
    cell_classes,
    check_stages,
    format_curriculum,
    image_features,
    option_ends,
    option_flag_loss,
    prompt_loss,
    symbolic_logits,
)

TINY = ToyArchitecture(vision_hidden=16, vision_layers=2, vision_heads=2, vision_intermediate=32, hidden=32,
                       layers=2, heads=2, kv_heads=1, intermediate=48)
STAGES = {
    "scenes": {"steps": 3, "lr": 1e-2, "warmup_steps": 1, "formats": {"short": 1.0}},
    "align": {"steps": 2, "lr": 1e-2, "warmup_steps": 1},
    "joint": {"steps": 2, "lr": 1e-2, "warmup_steps": 1, "formats": {"short": 1.0, "letter": 1.0}},
}


def test_cell_classes_read_the_scene_description(test_records):
    classes = cell_classes(test_records[:4])
    assert classes.shape == (4, 16)
    for record, row in zip(test_records[:4], classes.tolist()):
        assert " , ".join(CELL_CLASSES[i] for i in row) == record["lecture"]


def test_cell_classes_reject_records_without_a_scene():
    with pytest.raises(ValueError, match="has no toy scene description.*expected 16 comma-separated cells"):
        cell_classes([{"id": "x", "lecture": "a lecture about photosynthesis"}])


@pytest.mark.parametrize("stages, message", [
    ({"warmup": {"steps": 1, "lr": 1e-3}}, "unknown training stage"),
    ({"joint": {"steps": -1, "lr": 1e-3}}, "expected steps >= 0 and lr > 0"),
    ({"joint": {"steps": 5, "lr": 0}}, "expected steps >= 0 and lr > 0"),
    ({"scenes": {"steps": 0, "lr": 1e-3}}, "expected at least one step"),
    ({"scenes": {"steps": 1, "lr": 1e-3, "prompt_loss_weight": -0.5}},
     "prompt_loss_weight=-0.5; expected a number >= 0"),
    ({"joint": {"steps": 1, "lr": 1e-3, "prompt_loss_weight": "lots"}}, "prompt_loss_weight='lots'; expected a number"),
    ({"scenes": {"steps": 1, "lr": 1e-3, "option_flag_weight": -1}}, "option_flag_weight=-1; expected a number >= 0"),
    ({"joint": {"steps": 1, "lr": 1e-3, "option_flag_layer": 0}}, "option_flag_layer=0; expected a decoder layer"),
    ({"joint": {"steps": 1, "lr": 1e-3, "option_flag_layer": 1.5}}, "option_flag_layer=1.5; expected a decoder"),
])
def test_bad_stages_fail_clearly(stages, message):
    with pytest.raises(ValueError, match=message):
        check_stages(stages)


def test_prompt_loss_weight_defaults_to_zero_and_is_kept():
    stages = check_stages({"scenes": {"steps": 1, "lr": 1e-3, "prompt_loss_weight": 0.5},
                           "joint": {"steps": 1, "lr": 1e-3}})
    assert stages["scenes"]["prompt_loss_weight"] == 0.5 and stages["joint"]["prompt_loss_weight"] == 0.0


def test_prompt_loss_covers_the_prompt_text_only(test_records):
    """The prompt loss is the next-token loss at exactly the prompt's text targets: not the image tokens, not the
    answer (that is the answer loss), not the padding."""
    from efficientllava.data.prompts import LETTER

    model, processor = build_toy_llava(TINY, seed=0)
    batch = Collator(processor).answers(test_records[:3], [LETTER, "short", LETTER])
    image_id = model.config.image_token_id
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, model.config.text_config.vocab_size)
    per_sample = prompt_loss(logits, batch, image_id)
    for i in range(3):
        ids, mask, labels = batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i]
        targets = [t for t in range(1, len(ids))
                   if mask[t] == 1 and ids[t] != image_id and labels[t] == -100]
        assert targets and targets[-1] < int((labels != -100).nonzero()[0])  # stops before the answer
        expected = torch.stack([torch.nn.functional.cross_entropy(logits[i, t - 1], ids[t]) for t in targets]).mean()
        assert per_sample[i] == pytest.approx(float(expected), rel=1e-5)
    # the answer's logits do not enter it
    moved = logits.clone()
    answer_at = (batch["labels"] != -100).nonzero()
    moved[answer_at[:, 0], answer_at[:, 1] - 1] += 5.0
    assert torch.allclose(prompt_loss(moved, batch, image_id), per_sample)


def test_option_ends_are_the_last_word_of_each_lettered_option(test_records):
    from efficientllava.data.prompts import LETTER

    _, processor = build_toy_llava(TINY, seed=0)
    records = test_records[:6]
    formats = [LETTER, "short", LETTER, LETTER, "short", LETTER]
    batch = Collator(processor).answers(records, formats)
    ends = option_ends(batch["input_ids"], processor.tokenizer)
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    expected = [(i, k) for i, f in enumerate(formats) if f == LETTER for k in range(len(records[i]["choices"]))]
    assert [(row, k) for row, _, k in ends] == expected
    for row, position, k in ends:
        words = records[row]["choices"][k].split()
        assert tokens[row][position - len(words) + 1: position + 1] == words
        assert tokens[row][position - len(words) - 1: position - len(words) + 1] == ["ABCDE"[k], "."]


def test_option_flag_loss_says_yes_at_the_answer_only(test_records):
    """The flag loss is the yes/no cross-entropy of the logit lens at each option's last token, 'yes' exactly at
    the record's answer; 0 for a batch of short-answer prompts."""
    from efficientllava.data.prompts import LETTER

    model, processor = build_toy_llava(TINY, seed=0)
    records = test_records[:4]
    batch = Collator(processor).answers(records, [LETTER] * 4)
    torch.manual_seed(0)
    hidden = torch.randn(*batch["input_ids"].shape, 32)
    loss = option_flag_loss(model, hidden, batch, records, processor.tokenizer)
    no, yes = processor.tokenizer.convert_tokens_to_ids(["no", "yes"])
    terms = []
    for row, position, k in option_ends(batch["input_ids"], processor.tokenizer):
        lens = model.lm_head(model.model.language_model.norm(hidden[row, position]))
        target = yes if k == records[row]["answer"] else no
        terms.append(-torch.log_softmax(lens[[no, yes]], -1)[[no, yes].index(target)])
    assert sum(k == records[row]["answer"] for row, _, k in option_ends(batch["input_ids"], processor.tokenizer)) == 4
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    short = Collator(processor).answers(records, ["short"] * 4)
    assert float(option_flag_loss(model, hidden, short, records, processor.tokenizer)) == 0.0


@pytest.mark.parametrize("stage", ["scenes", "joint"])
def test_option_flag_weight_adds_the_flag_loss_in_scenes_and_joint(test_records, stage):
    from efficientllava.data.prompts import LETTER

    model, processor = build_toy_llava(TINY, seed=0)
    records = test_records[:4]
    batch = {**Collator(processor).answers(records, [LETTER, "short", LETTER, LETTER]), "records": records}
    losses = {}
    for weight in (0.0, 2.0):
        stages = {name: {**cfg, "option_flag_weight": weight, "option_flag_layer": 1} for name, cfg in STAGES.items()
                  if name != "align"}
        torch.manual_seed(0)  # the same scene embedding both times
        module = StagedToyTraining(model, processor, ["colour"], stages)
        module.stage_at = lambda step: stage
        losses[weight] = module.training_step(batch, 0)
    if stage == "scenes":
        _, hidden = symbolic_logits(model, module.scene, batch, cell_classes(records), output_hidden_states=True)
    else:
        hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                       output_hidden_states=True).hidden_states
    flag = option_flag_loss(model, hidden[1], batch, records, processor.tokenizer)
    assert float(flag) > 0
    assert float(losses[2.0]) == pytest.approx(float(losses[0.0]) + 2.0 * float(flag), rel=1e-5)


def test_option_flag_layer_beyond_the_model_fails_clearly():
    model, processor = build_toy_llava(TINY, seed=0)
    stages = {"scenes": {"steps": 1, "lr": 1e-3, "option_flag_weight": 1.0, "option_flag_layer": 3}}
    with pytest.raises(ValueError, match="option_flag_layer=3; the language model has 2 layers"):
        StagedToyTraining(model, processor, ["colour"], stages)


def test_image_layout_puts_the_image_before_or_after_the_text(test_records):
    before = build_toy_llava(TINY, seed=0)[1]  # the default: LLaVA-1.5's layout
    after = build_toy_llava(ToyArchitecture(**{**TINY.__dict__, "image_layout": "after_text"}), seed=0)[1]
    for processor, image_first in ((before, True), (after, False)):
        ids = Collator(processor).prompts(test_records[:1], ["short"])["input_ids"][0].tolist()
        tokens = processor.tokenizer.convert_ids_to_tokens(ids)
        image, question = tokens.index("<image>"), tokens.index(test_records[0]["question"].split()[0])
        assert (image < question) == image_first and tokens[-2:] == ["ASSISTANT", ":"]
    with pytest.raises(ValueError, match="image_layout='top'.*expected one of \\['after_text', 'before_text'\\]"):
        build_toy_llava(ToyArchitecture(image_layout="top"))


def test_attn_implementation_sets_the_training_kernels_and_is_not_saved(test_records, tmp_path):
    default, processor = build_toy_llava(TINY, seed=0)
    eager = build_toy_llava(TINY, seed=0, attn_implementation="eager")[0]
    assert default.config._attn_implementation != "eager"
    assert {c._attn_implementation for c in (eager.config, eager.config.text_config, eager.config.vision_config)} == {
        "eager"}
    batch = Collator(processor).prompts(test_records[:4], ["short"] * 4)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():  # same weights, other kernels: the same logits up to rounding
        torch.testing.assert_close(eager(**inputs).logits, default(**inputs).logits, atol=1e-5, rtol=1e-4)
    eager.save_pretrained(tmp_path)
    assert "eager" not in (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="attn_implementation='fastest' is not available for the toy LLaVA"):
        build_toy_llava(TINY, attn_implementation="fastest")


def test_format_curriculum_follows_the_stages():
    assert format_curriculum(STAGES) == [[0, {"short": 1.0}], [3, {"short": 1.0}], [5, {"short": 1.0, "letter": 1.0}]]


def test_symbolic_logits_put_the_scene_where_the_image_goes(test_records):
    model, processor = build_toy_llava(TINY, seed=0)
    module = StagedToyTraining(model, processor, ["colour"], STAGES)
    batch = Collator(processor).answers(test_records[:3], ["short"] * 3)
    classes = cell_classes(test_records[:3])
    logits = symbolic_logits(model, module.scene, batch, classes)
    assert logits.shape[:2] == batch["input_ids"].shape
    # changing one record's scene changes that record's logits after the image, and no other record's
    other = classes.clone()
    other[1] = (other[1] + 1) % len(CELL_CLASSES)
    changed = symbolic_logits(model, module.scene, batch, other)
    assert torch.allclose(changed[0], logits[0]) and torch.allclose(changed[2], logits[2])
    assert not torch.allclose(changed[1], logits[1])
    with pytest.raises(ValueError, match="image tokens; expected 16 per record"):
        symbolic_logits(model, module.scene, batch, classes[:2])


def _snapshot(model):
    inner = model.model
    return {
        "language": [p.detach().clone() for p in inner.language_model.parameters()],
        "vision": [p.detach().clone() for p in [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters()]],
    }


def _changed(before, after):
    return {k: any(not torch.equal(a, b) for a, b in zip(before[k], after[k])) for k in before}


def test_each_stage_trains_only_its_own_parameters(small_benchmark, tmp_path):
    """scenes moves the language model only, align the vision side only, joint both; the scene embedding is
    trained in scenes and then fixed."""
    model, processor = build_toy_llava(TINY, seed=0)
    data = BenchmarkDataModule(lambda: small_benchmark, processor, batch_size=4, eval_batch_size=16,
                               train_formats=format_curriculum(STAGES), n_val=8)
    module = StagedToyTraining(model, processor, data.categories(), STAGES)
    snapshots = [_snapshot(model)]
    scene_after_scenes = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(_snapshot(model))
            if trainer.global_step == 3:
                scene_after_scenes.append(pl_module.scene.content.weight.detach().clone())

    trainer = pl.Trainer(max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, callbacks=[Snap()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    steps = [_changed(snapshots[i], snapshots[i + 1]) for i in range(7)]
    assert [module.stage_at(i) for i in range(7)] == ["scenes"] * 3 + ["align"] * 2 + ["joint"] * 2
    assert all(s == {"language": True, "vision": False} for s in steps[:3])
    assert all(s == {"language": False, "vision": True} for s in steps[3:5])
    assert all(s == {"language": True, "vision": True} for s in steps[5:])
    assert torch.equal(scene_after_scenes[0], module.scene.content.weight)
    pixels = Collator(processor).prompts([small_benchmark["train"][0]], ["short"])["pixel_values"]
    assert image_features(model, pixels).shape == (1, 16, 32)  # one projected vector per image token, as the scene


def test_validation_in_the_scenes_stage_reads_the_scene_not_the_pixels(test_records):
    """While only the language model trains, val letter accuracy is measured with the scene embedding where the
    image goes (the vision tower is untrained then): the same choices as scoring symbolic logits directly, whatever
    the vision side holds."""
    from efficientllava.data.prompts import LETTER
    from efficientllava.evaluation import letter_choices

    records = test_records[:8]
    model, processor = build_toy_llava(TINY, seed=0)
    module = StagedToyTraining(model, processor, sorted({r["category"] for r in records}), STAGES)
    assert module.stage_at(module.global_step) == "scenes"
    batch = Collator(processor).prompts(records, [LETTER] * len(records))
    with torch.no_grad():
        expected = letter_choices(symbolic_logits(model, module.scene, batch, cell_classes(records)), batch, records,
                                  module.letter_ids)
    hits = []
    for scale in (1.0, 0.0):  # 0: the projector outputs nothing, which only the image path would notice
        with torch.no_grad():
            for p in model.model.multi_modal_projector.parameters():
                p.mul_(scale)
        module.validation_step(records, 0)
        hits.append(dict(module.tally.records))
        module.tally.reset()
    assert hits[0] == hits[1] == {r["id"]: (module.tally.categories.index(r["category"]), (e == r["answer"],),
                                            (e == 0,), r["answer"] == 0) for r, e in zip(records, expected)}


def test_scene_neighbours_and_summary_reach_the_cells_they_should():
    """scene.neighbours adds each cell's four neighbours' contents (so a change in one cell moves that cell and its
    up to four neighbours), scene.summary adds the same whole-scene vector to every cell; both off: the cell alone."""
    from efficientllava.toy_training import SceneEmbedding, _INDEX

    torch.manual_seed(0)
    classes = torch.full((1, 16), _INDEX["empty"])
    classes[0, 5] = _INDEX["red circle"]
    around = SceneEmbedding(8, neighbours=True).around(classes)[0]
    assert around.shape == (4, 16)  # left, right, above, below
    assert [int(around[d].ne(_INDEX["empty"]).nonzero()) for d in range(4)] == [6, 4, 9, 1]
    other = classes.clone()
    other[0, 5] = _INDEX["blue square"]
    for options, moved in [({}, {5}), ({"neighbours": True}, {1, 4, 5, 6, 9}), ({"summary": True}, set(range(16)))]:
        scene = SceneEmbedding(8, **options)
        changed = (scene(classes) - scene(other)).abs().sum(-1)[0].nonzero().flatten().tolist()
        assert set(changed) == moved, options


def test_a_factored_scene_builds_each_content_from_its_colour_and_shape():
    """scene.factored: 'red circle' is the red embedding plus the circle embedding (a digit and 'empty' are one
    attribute each), at the cell and, with neighbours, at the cells next to it; changing only the shape moves the
    same cells as with atomic contents."""
    from efficientllava.toy_training import ATTRIBUTES, CELL_CLASSES, SceneEmbedding, _INDEX, attribute_matrix

    matrix = attribute_matrix()
    assert matrix.shape == (len(CELL_CLASSES), len(ATTRIBUTES))
    assert matrix[_INDEX["empty"]].sum() == 1 and matrix[_INDEX["digit 7"]].sum() == 1
    assert [ATTRIBUTES[i] for i in matrix[_INDEX["blue cross"]].nonzero().flatten()] == ["blue", "cross"]
    torch.manual_seed(0)
    scene = SceneEmbedding(8, factored=True, neighbours=True)
    classes = torch.full((1, 16), _INDEX["empty"])
    classes[0, 5] = _INDEX["red circle"]
    content = scene.content.weight
    expected = content[ATTRIBUTES.index("red")] + content[ATTRIBUTES.index("circle")] + scene.position[5]
    table = scene.neighbours.weight.view(4, len(ATTRIBUTES), -1)
    expected = expected + table[:, ATTRIBUTES.index("empty")].sum(0)  # all four neighbours of cell 5 are empty
    assert torch.allclose(scene(classes)[0, 5], expected, atol=1e-6)
    assert classes[0, 6] == _INDEX["empty"]  # cell 6 is empty; its left neighbour, cell 5, is the red circle
    got = scene(classes)[0, 6] - scene(torch.full((1, 16), _INDEX["empty"]))[0, 6]
    left = table[0]  # direction 0: the content of the cell to the left
    want = left[ATTRIBUTES.index("red")] + left[ATTRIBUTES.index("circle")] - left[ATTRIBUTES.index("empty")]
    assert torch.allclose(got, want, atol=1e-6)
    other = classes.clone()
    other[0, 5] = _INDEX["red square"]
    changed = (scene(classes) - scene(other)).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert set(changed) == {1, 4, 5, 6, 9}


@pytest.mark.parametrize("scene, message", [({"neighbors": True}, "unknown scene option"),
                                            ({"summary": "yes"}, "scene.summary='yes'; expected true or false")])
def test_bad_scene_options_fail_clearly(scene, message):
    from efficientllava.toy_training import check_scene

    with pytest.raises(ValueError, match=message):
        check_scene(scene)
