"""How `train.py` teaches the toy LLaVA: three stages under one Lightning Trainer.

Trained from scratch on pixels alone, a LLaVA this small sits for thousands of steps at the answer prior: the
language model cannot learn to find and relate objects while the vision tower is still learning to see them, and
neither gets a useful gradient without the other. So the toy is taught in stages, as LLaVA separates alignment from
instruction tuning:

1. `scenes`: the language model learns the benchmark's tasks from *symbolic* scenes. At the image-token positions
   it reads a learned embedding of each cell's true content (`empty`, `red circle`, `digit 7`, ...) plus one of the
   cell's position, instead of the projector's output.
2. `align`: the vision tower and the projector learn to produce exactly those embeddings from pixels (a
   regression; the language model is untouched).
3. `joint`: the whole LLaVA is fine-tuned end to end on images (`training.LlavaTrainingModule`'s loss).

One Trainer runs the stages back to back (the stage follows the global step), so a run resumes from any
checkpoint and logs one monotonic step axis. The scene embedding is a training device only: the saved model is a
plain `LlavaForConditionalGeneration`.
"""
from __future__ import annotations

import torch
from torch import nn

from efficientllava.data.collate import IGNORE
from efficientllava.data.prompts import INSTRUCTIONS, LETTER, LETTERS
from efficientllava.data.scenes import COLOURS, GRID, SHAPES
from efficientllava.evaluation import MODEL_INPUTS, letter_choices
from efficientllava.models import image_features
from efficientllava.training import LlavaTrainingModule, cosine_schedule, per_sample_loss

STAGES = ("scenes", "align", "joint")
DIRECTIONS = ("left", "right", "above", "below")  # of a cell's neighbours (SceneEmbedding)
CELL_CLASSES = ("empty", *(f"{c} {s}" for c in COLOURS for s in SHAPES), *(f"digit {d}" for d in range(10)))
_INDEX = {name: i for i, name in enumerate(CELL_CLASSES)}
# the attributes a cell's content is made of ('red circle' = red + circle), for SceneEmbedding(factored=True)
ATTRIBUTES = ("empty", *COLOURS, *SHAPES, *(f"digit {d}" for d in range(10)))


def attribute_matrix() -> torch.Tensor:
    """(CELL_CLASSES, ATTRIBUTES) 0/1: which attributes each cell content has."""
    out = torch.zeros(len(CELL_CLASSES), len(ATTRIBUTES))
    index = {name: i for i, name in enumerate(ATTRIBUTES)}
    for row, name in enumerate(CELL_CLASSES):
        parts = [name] if name == "empty" or name.startswith("digit") else name.split()
        for part in parts:
            out[row, index[part]] = 1.0
    return out


def cell_classes(records: list[dict]) -> torch.Tensor:
    """(batch, cells) indices into CELL_CLASSES, read from each record's `lecture` (the toy benchmark's
    cell-by-cell description of its scene)."""
    rows = []
    for record in records:
        cells = [c.strip() for c in (record.get("lecture") or "").split(",")]
        if len(cells) != GRID * GRID or any(c not in _INDEX for c in cells):
            raise ValueError(
                f"record {record.get('id')!r} has no toy scene description in its lecture "
                f"({record.get('lecture')!r}); expected {GRID * GRID} comma-separated cells such as 'empty' or "
                "'red circle' (the scenes and align stages only train on the toy benchmark)"
            )
        rows.append([_INDEX[c] for c in cells])
    return torch.tensor(rows, dtype=torch.long)


class SceneEmbedding(nn.Module):
    """What a perfect vision tower + projector would hand the language model, per cell: an embedding of the
    cell's content plus one of its row and one of its column. Rows and columns start on a line (a random
    direction scaled from -1 to 1), so "left of" and "above" begin as linear comparisons.

    A vision tower attends across the whole image, so its features are contextual. Two options hand the language
    model some of that context too, as a contextual tower could compute it: `neighbours` adds, at each cell, the
    contents of its four neighbours (left, right, above, below; 'empty' past the grid's edge), each direction
    through its own embedding; `summary` adds, at every cell, the sum of a per-content embedding over the scene's
    cells (a linear function of how many cells hold each content, what a head attending evenly to all cells sees).
    `factored` builds each content from its attributes, as a tower that sees colour and shape separately would:
    'red circle' is an embedding of red plus one of circle (ATTRIBUTES), not a vector of its own."""

    def __init__(self, hidden: int, grid: int = GRID, std: float = 0.02, neighbours: bool = False,
                 summary: bool = False, factored: bool = False):
        super().__init__()
        self.grid = grid
        kinds = len(ATTRIBUTES) if factored else len(CELL_CLASSES)  # the rows of each content table
        self.content = nn.Embedding(kinds, hidden)
        nn.init.normal_(self.content.weight, std=std)
        self.register_buffer("attributes", attribute_matrix() if factored else None, persistent=False)
        ramp = torch.linspace(-1.0, 1.0, grid)[:, None]
        self.row = nn.Parameter(ramp * torch.randn(1, hidden) * std)
        self.column = nn.Parameter(ramp * torch.randn(1, hidden) * std)
        self.neighbours = nn.Embedding(len(DIRECTIONS) * kinds, hidden) if neighbours else None
        self.summary = nn.Embedding(len(CELL_CLASSES), hidden) if summary else None
        for table in (self.neighbours, self.summary):
            if table is not None:
                nn.init.normal_(table.weight, std=std)

    @property
    def position(self) -> torch.Tensor:
        """(cells, hidden) in reading order."""
        return (self.row[:, None, :] + self.column[None, :, :]).reshape(self.grid * self.grid, -1)

    def around(self, classes: torch.Tensor) -> torch.Tensor:
        """(batch, DIRECTIONS, cells): the content class of each cell's neighbour in each direction."""
        grid = classes.view(-1, self.grid, self.grid)
        edge = _INDEX["empty"]
        padded = nn.functional.pad(grid, (1, 1, 1, 1), value=edge)
        inner = slice(1, self.grid + 1)
        shifted = [padded[:, inner, :-2], padded[:, inner, 2:], padded[:, :-2, inner], padded[:, 2:, inner]]
        return torch.stack(shifted, 1).reshape(classes.shape[0], len(DIRECTIONS), -1)

    def _content(self, classes: torch.Tensor) -> torch.Tensor:
        if self.attributes is None:
            return self.content(classes)
        return self.attributes[classes].to(self.content.weight.dtype) @ self.content.weight

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        out = self._content(classes) + self.position
        if self.neighbours is not None and self.attributes is None:
            offsets = torch.arange(len(DIRECTIONS), device=classes.device)[None, :, None] * len(CELL_CLASSES)
            out = out + self.neighbours(self.around(classes) + offsets).sum(1)
        elif self.neighbours is not None:
            table = self.neighbours.weight.view(len(DIRECTIONS), len(ATTRIBUTES), -1)
            attributes = self.attributes[self.around(classes)].to(table.dtype)  # (batch, directions, cells, attrs)
            out = out + torch.einsum("bdca,dah->bch", attributes, table)
        if self.summary is not None:
            out = out + self.summary(classes).sum(-2, keepdim=True) / self.grid
        return out


def alignment_loss(features: torch.Tensor, target: torch.Tensor, classes: torch.Tensor, object_weight: float = 4.0):
    """Squared error of each image token against its cell's scene embedding, relative to the mean squared norm of
    the targets; cells holding an object weigh `object_weight` times an empty cell (most cells are empty, and a
    wrong object costs the language model far more than a slightly noisy empty cell)."""
    error = (features - target).pow(2).sum(-1) / target.pow(2).sum(-1).mean().clamp(min=1e-12)
    weight = torch.where(classes != _INDEX["empty"], float(object_weight), 1.0).to(error.dtype)
    return (error * weight).sum() / weight.sum()


def symbolic_logits(model, scene: SceneEmbedding, batch: dict, classes: torch.Tensor, output_hidden_states=False):
    """The LLaVA's logits with the scene embedding in place of the projected image features (and the language
    model's hidden states, embeddings first, with `output_hidden_states`)."""
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    image = input_ids == model.config.image_token_id
    cells = scene(classes.to(input_ids.device)).to(embeds.dtype)
    if int(image.sum()) != cells.shape[0] * cells.shape[1]:
        raise ValueError(
            f"the prompts hold {int(image.sum())} image tokens; expected {cells.shape[1]} per record "
            f"({cells.shape[0]} records)"
        )
    embeds = embeds.masked_scatter(image.unsqueeze(-1).expand_as(embeds), cells.reshape(-1, cells.shape[-1]))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                     output_hidden_states=output_hidden_states)
    logits = model.lm_head(out.last_hidden_state)
    return (logits, out.hidden_states) if output_hidden_states else logits


def prompt_loss(logits: torch.Tensor, batch: dict, image_token_id: int) -> torch.Tensor:
    """Per-sample next-token cross-entropy over the prompt's own text (not its image tokens, answer or padding),
    standing in for the text pre-training a real LLaVA's language model had. A stage adds it to the answer loss
    with weight `prompt_loss_weight` (0: off): it is what let the toy's language model bind an option's text to its
    letter in `experiments/letter_binding.py` (README)."""
    target = batch["input_ids"][:, 1:]
    keep = (batch["attention_mask"][:, 1:] == 1) & (target != image_token_id) & (batch["labels"][:, 1:] == IGNORE)
    token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).view(target.shape)
    return (token * keep).sum(1) / keep.sum(1).clamp(min=1)


def option_ends(input_ids: torch.Tensor, tokenizer) -> list[tuple[int, int, int]]:
    """(row, position, option index) of the last token of every lettered option ("B. red circle" → 'circle') in a
    batch of toy prompts; prompts without options (the short format) contribute none. Options are the `X .` runs
    before the letter format's instruction ("Answer with the option's letter ...")."""
    ids = tokenizer.convert_tokens_to_ids
    letters = {ids(letter): i for i, letter in enumerate(LETTERS)}
    dot, instruction = ids("."), ids(INSTRUCTIONS[LETTER].split()[:2])
    ends = []
    for row, seq in enumerate(input_ids.tolist()):
        stop = next((j for j in range(len(seq) - 1) if seq[j:j + 2] == instruction), None)
        if stop is None:
            continue
        starts = [j for j in range(stop - 1) if seq[j] in letters and seq[j + 1] == dot]
        for start, end in zip(starts, [s - 1 for s in starts[1:]] + [stop - 1]):
            ends.append((row, end, letters[seq[start]]))
    return ends


def option_flag_loss(model, hidden: torch.Tensor, batch: dict, records: list[dict], tokenizer) -> torch.Tensor:
    """A training device for the lettered format: at the last token of each option, the language model's hidden
    state after a chosen layer (`hidden`, (batch, tokens, width)), read out through its final norm and LM head over
    the words 'no' and 'yes' (a logit lens), should say whether that option is the record's answer.
    Cross-entropy over all options of the batch; 0 when no prompt has options.

    Trained on the letter alone, the toy's language model never finds which option it computed (the letter format
    stays at chance); with each option judging itself first, the answer position only has to find the option that
    said 'yes' and copy its letter (README, "The toy LLaVA")."""
    ends = option_ends(batch["input_ids"], tokenizer)
    if not ends:
        return hidden.new_zeros(())
    rows, cols, options = (torch.tensor(v, device=hidden.device) for v in zip(*ends))
    answers = torch.tensor([records[r]["answer"] for r in rows.tolist()], device=hidden.device)
    words = tokenizer.convert_tokens_to_ids(["no", "yes"])
    lens = model.lm_head(model.model.language_model.norm(hidden[rows, cols]))[:, words]
    return torch.nn.functional.cross_entropy(lens.float(), (options == answers).long())


def _non_negative(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= 0:
        raise ValueError(f"{what}={value!r}; expected a number >= 0")
    return number


def check_stages(stages: dict) -> dict[str, dict]:
    """Stage settings in STAGES order: {name: {steps, lr, warmup_steps, formats, and object_weight (align) or
    prompt_loss_weight, option_flag_weight, option_flag_layer (scenes, joint)}}; unknown names are errors."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown training stage(s) {unknown}; expected some of {list(STAGES)}")
    out = {}
    for name in STAGES:
        if name not in stages:
            continue
        stage = dict(stages[name])
        if int(stage.get("steps", -1)) < 0 or float(stage.get("lr", -1)) <= 0:
            raise ValueError(f"stage {name!r} has steps={stage.get('steps')!r} lr={stage.get('lr')!r}; "
                             "expected steps >= 0 and lr > 0")
        formats = stage.get("formats") or {"short": 1.0}
        if isinstance(formats, dict):
            formats = [[0, formats]]
        try:
            formats = [[int(offset), dict(weights)] for offset, weights in formats]
        except (TypeError, ValueError):
            raise ValueError(f"stage {name!r} has formats={formats!r}; expected {{format: weight}} or a list of "
                             "[step within the stage, {format: weight}]") from None
        if formats[0][0] != 0:
            raise ValueError(f"stage {name!r}: its first formats must start at step 0 of the stage")
        out[name] = {"steps": int(stage["steps"]), "lr": float(stage["lr"]),
                     "warmup_steps": int(stage.get("warmup_steps", 0)), "formats": formats}
        if name == "align":
            out[name]["object_weight"] = float(stage.get("object_weight", 4.0))
        else:
            out[name]["prompt_loss_weight"] = _non_negative(stage.get("prompt_loss_weight", 0.0),
                                                            f"stage {name!r} has prompt_loss_weight")
            out[name]["option_flag_weight"] = _non_negative(stage.get("option_flag_weight", 0.0),
                                                            f"stage {name!r} has option_flag_weight")
            layer = stage.get("option_flag_layer", 2)
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
                raise ValueError(f"stage {name!r} has option_flag_layer={layer!r}; expected a decoder layer number "
                                 ">= 1 (the flag is read after that layer)")
            out[name]["option_flag_layer"] = layer
    if not any(s["steps"] for s in out.values()):
        raise ValueError("every training stage has 0 steps; expected at least one step")
    return out


def check_scene(scene: dict | None) -> dict[str, bool]:
    """SceneEmbedding's options ({neighbours, summary, factored}, each true or false; None: all off)."""
    scene = dict(scene or {})
    options = ["neighbours", "summary", "factored"]
    unknown = sorted(set(scene) - set(options))
    if unknown:
        raise ValueError(f"unknown scene option(s) {unknown}; expected some of {options}")
    for key, value in scene.items():
        if not isinstance(value, bool):
            raise ValueError(f"scene.{key}={value!r}; expected true or false")
    return scene


def stage_starts(stages: dict[str, dict]) -> dict[str, int]:
    starts, step = {}, 0
    for name, stage in stages.items():
        starts[name] = step
        step += stage["steps"]
    return starts


def format_curriculum(stages: dict) -> list:
    """The datamodule's answer-format curriculum that follows the stages ([first step, {format: weight}])."""
    stages = check_stages(stages)
    starts = stage_starts(stages)
    return [[starts[name] + offset, weights] for name, stage in stages.items() if stage["steps"]
            for offset, weights in stage["formats"] if offset < stage["steps"]]


class StagedToyTraining(LlavaTrainingModule):
    """The toy's scenes → align → joint training as one LightningModule (validation as in the base module)."""

    def __init__(self, model, processor, categories, stages: dict, grad_clip=1.0, betas=(0.9, 0.999), weight_decay=0.0,
                 scene: dict | None = None):
        stages = check_stages(stages)
        layers = model.config.text_config.num_hidden_layers
        for name, stage in stages.items():
            if stage.get("option_flag_weight") and stage["option_flag_layer"] > layers:
                raise ValueError(f"stage {name!r} has option_flag_layer={stage['option_flag_layer']}; the language "
                                 f"model has {layers} layers")
        super().__init__(model, processor, categories, lr=1.0, weight_decay=weight_decay, grad_clip=grad_clip,
                         betas=betas)
        self.stages, self.starts = stages, stage_starts(stages)
        self.total_steps = sum(s["steps"] for s in stages.values())
        self.object_weight = stages.get("align", {}).get("object_weight", 4.0)
        self.scene = SceneEmbedding(model.config.text_config.hidden_size, **check_scene(scene))
        self.save_hyperparameters(ignore=["model", "processor"])

    def stage_at(self, step: int) -> str:
        current = next(iter(self.stages))
        for name, start in self.starts.items():
            if step >= start and self.stages[name]["steps"]:
                current = name
        return current

    def training_step(self, batch, batch_idx):
        stage = self.stage_at(self.global_step)
        if stage == "align":
            classes = cell_classes(batch["records"]).to(self.device)
            with torch.no_grad():
                target = self.scene(classes)
            features = image_features(self.model, batch["pixel_values"])
            loss = alignment_loss(features, target, classes=classes, object_weight=self.object_weight)
            self.log_step("align/loss", loss, prog_bar=True)
            return loss
        flag = self.stages[stage]["option_flag_weight"]
        if stage == "scenes":
            out = symbolic_logits(self.model, self.scene, batch, cell_classes(batch["records"]), bool(flag))
            logits, hidden = out if flag else (out, None)
        else:
            out = self.model(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=bool(flag))
            logits, hidden = out.logits, out.hidden_states
        loss = per_sample_loss(logits, batch["labels"]).mean()
        self.log_step(f"{stage if stage == 'scenes' else 'train'}/loss", loss, prog_bar=True)
        weight = self.stages[stage]["prompt_loss_weight"]
        if weight:
            extra = prompt_loss(logits, batch, self.model.config.image_token_id).mean()
            self.log_step(f"{stage}/prompt_loss", extra)
            loss = loss + weight * extra
        if flag:
            extra = option_flag_loss(self.model, hidden[self.stages[stage]["option_flag_layer"]], batch,
                                     batch["records"], self.collator.tokenizer)
            self.log_step(f"{stage}/option_flag_loss", extra)
            loss = loss + flag * extra
        return loss

    def validation_step(self, records, batch_idx):
        """Letter accuracy on val records (`val/acc...`); while the scenes stage trains, with the scene embedding in
        place of the not yet trained vision tower (`val_symbolic/acc...`): what the language model has learned."""
        if self.stage_at(self.global_step) != "scenes":
            return super().validation_step(records, batch_idx)
        self.model.eval()
        with torch.no_grad():
            batch = self.collator.prompts(records, [LETTER] * len(records))
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = symbolic_logits(self.model, self.scene, batch, cell_classes(records))
            self.tally.add(records, [letter_choices(logits, batch, records, self.letter_ids)])
        return None

    def on_validation_epoch_end(self):
        if self.stage_at(self.global_step) != "scenes":
            return super().on_validation_epoch_end()
        self.model.train()
        for key, value in self.tally.compute(self).items():
            self.log(f"val_symbolic/{key}", float(value), prog_bar=key == "acc")
        return None

    def _group_schedule(self, trained_in: tuple[str, ...]):
        """Learning rate of a parameter group by global step: the stage's warm-up + cosine while the group is
        trained in that stage, 0 otherwise (its parameters then get no gradient at all)."""
        pieces = []
        for name in trained_in:
            if name in self.stages and self.stages[name]["steps"]:
                stage = self.stages[name]
                pieces.append((self.starts[name], stage, cosine_schedule(stage["warmup_steps"], stage["steps"])))

        def lr(step: int) -> float:
            for start, stage, factor in pieces:
                if start <= step < start + stage["steps"]:
                    return stage["lr"] * factor(step - start)
            return 0.0

        return lr

    def configure_optimizers(self):
        inner = self.model.model
        groups = {
            "language": ([*inner.language_model.parameters(), *self.model.lm_head.parameters()], ("scenes", "joint")),
            "vision": ([*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters()],
                       ("align", "joint")),
            "scene": (list(self.scene.parameters()), ("scenes",)),
        }
        seen, param_groups, schedules = set(), [], []
        for name, (params, trained_in) in groups.items():
            params = [p for p in params if id(p) not in seen]
            seen.update(id(p) for p in params)
            for decay in (True, False):
                chosen = [p for p in params if (p.ndim >= 2) == decay]
                if chosen:
                    param_groups.append({"params": chosen, "lr": 1.0, "name": f"{name}{'' if decay else '_no_decay'}",
                                         "weight_decay": self.weight_decay if decay else 0.0})
                    schedules.append(self._group_schedule(trained_in))
        missing = [n for n, p in self.model.named_parameters() if id(p) not in seen]
        if missing:
            raise ValueError(f"parameters outside the language model, vision tower and projector: {missing[:5]}")
        optimizer = torch.optim.AdamW(param_groups, lr=1.0, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
