"""Search-space evolution: train only the multi-modal projector to raise the accuracy of the best pruned models.

EfficientLLaVA optimizes the projector (LLaVA's 2-layer MLP connector) so that the upper bound of performance over
the search space rises; over all policies that is out of reach, so it is approximated by the current top-k policies:

    loss(projector) = 1/k * sum_{p in top-k} LM answer loss of the model pruned by p, on the N search samples.

`search.projector.loss=distill` replaces the answer loss by KL(dense model || pruned model) at the answer
positions, with the dense model's distributions taken once before the first round (`with_teacher`).

`ProjectorTuner` is a LightningModule with manual optimization: in each step it assembles every top-k policy from
the bank in turn (no pruning call) and runs forward + backward of its share of the loss down to the projector's
output (held as a detached leaf, so one policy's activations live at a time); then one backward through the
projector itself, with the output gradients of all policies, gives the gradient of the averaged loss, and one
optimizer step follows. One backward per step through the trainable parameters is what DDP needs: with several
devices (`devices=2, strategy="ddp"`, gloo on the CPU) each device takes its share of the batches and DDP averages
the projector's gradient. Everything else is frozen (requires_grad off, before DDP wraps the module), the dense
weights are restored when training ends and the original requires_grad flags come back. Nothing is random (no
shuffling, no dropout: the model stays in eval mode), so a round gives the same projector on every run on the same
machine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from efficientllava.data.collate import IGNORE
from efficientllava.evaluation import MODEL_INPUTS
from efficientllava.pruning.layers import PROJECTOR

log = logging.getLogger(__name__)


def projector_module(model) -> torch.nn.Module:
    """The multi-modal projector (`multi_modal_projector` or `mm_projector`) of a LLaVA."""
    for name, module in model.named_modules():
        if name and PROJECTOR.search(name) and not PROJECTOR.search(name.rsplit(".", 1)[0]):
            return module
    raise ValueError("the model has no multi-modal projector (no module named multi_modal_projector or "
                     "mm_projector); expected a LLaVA")


def projector_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in projector_module(model).state_dict().items()}


def load_projector_state(model, state: dict[str, torch.Tensor]) -> None:
    projector_module(model).load_state_dict(state)


def save_projector(path: str | Path, model) -> Path:
    """Write the projector's weights (safetensors) through a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in projector_state(model).items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_projector(path: str | Path, model) -> None:
    from safetensors.torch import load_file

    load_projector_state(model, load_file(str(path)))


LOSSES = ("answer", "distill")


def answer_logits(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict the labelled (answer) tokens and those tokens: the LM head applied at those
    positions only (not at the ~600 prompt positions of a LLaVA-1.5 sample)."""
    hidden = model.model(**inputs).last_hidden_state[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE
    return model.lm_head(hidden[keep]).float(), targets[keep]


def answer_loss(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss on the labelled (answer) tokens, equal to `model(**inputs, labels=labels).loss`."""
    logits, targets = answer_logits(model, inputs, labels)
    return torch.nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def with_teacher(model, batches: list[dict]) -> list[dict]:
    """Copies of `batches` carrying `teacher`: the model's log-probabilities at their answer positions, taken now
    (from the dense model with its original projector, before any round) for the `distill` loss."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for batch in batches:
            logits, _ = answer_logits(model, {k: batch[k].to(device) for k in MODEL_INPUTS}, batch["labels"])
            out.append({**batch, "teacher": torch.log_softmax(logits, -1).cpu()})
        return out
    finally:
        model.train(was_training)


def round_loss(model, inputs: dict, batch: dict) -> torch.Tensor:
    """A projector round's loss on one batch: with `teacher` in the batch, KL(dense teacher || pruned model) over
    the vocabulary at the answer positions (the pruned model is pulled back to the dense one's answers, whatever
    the gold labels); otherwise the answer loss on the gold labels (the paper's)."""
    if "teacher" not in batch:
        return answer_loss(model, inputs, batch["labels"])
    logits, _ = answer_logits(model, inputs, batch["labels"])
    teacher = batch["teacher"].to(logits.device)
    return torch.nn.functional.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True,
                                      reduction="batchmean")


# what the held-back samples judge a round by (search.projector.check), and how the log names it
CHECKS = {"both": "task score and loss", "score": "task score", "loss": "loss"}


def round_accepted(check: str, before_score: float, after_score: float, before_loss: float, after_loss: float) -> bool:
    """Whether a projector round is kept: the held-back samples must not get worse by the measure(s) `check` names.

    score: the search's task score does not fall; loss: the answer loss does not rise; both: neither happens.
    """
    if check not in CHECKS:
        raise ValueError(f"search.projector.check is {check!r}; expected one of {list(CHECKS)}")
    score_ok, loss_ok = after_score >= before_score, after_loss <= before_loss
    return {"score": score_ok, "loss": loss_ok, "both": score_ok and loss_ok}[check]


@torch.no_grad()
def mean_over_policies(model, bank, policies: list[dict], measure) -> float:
    """`measure(model)` averaged over `policies` assembled from `bank` (no training); the model ends dense."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for policy in policies:
            bank.assemble(model, policy)
            total += float(measure(model)) / len(policies)
    finally:
        bank.restore(model)
        model.train(was_training)
    return total


def check_loss(model, bank, policies: list[dict], batches: list[dict]) -> float:
    """The answer loss on `batches` averaged over `policies` assembled from `bank` (no training); the model ends
    dense."""
    device = next(model.parameters()).device

    def loss(model) -> float:
        return sum(float(answer_loss(model, {k: b[k].to(device) for k in MODEL_INPUTS}, b["labels"]))
                   for b in batches) / len(batches)

    return mean_over_policies(model, bank, policies, loss)


class _Batches(Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class ProjectorTuner(pl.LightningModule):
    """Trains the projector on the round loss (`round_loss`) averaged over `policies` assembled from `bank`."""

    def __init__(self, model, bank, policies: list[dict], batches: list[dict], lr: float = 1e-3,
                 weight_decay: float = 0.0):
        super().__init__()
        if not policies:
            raise ValueError("the projector round was given no policies; expected the top-k candidates")
        if not batches:
            raise ValueError("the projector round was given no batches; expected the search samples")
        self.model, self.bank = model, bank
        self.policies, self.batches = list(policies), list(batches)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.automatic_optimization = False
        self.losses: list[float] = []
        self._flags: dict[str, bool] = {}

    def projector_parameters(self):
        return list(projector_module(self.model).parameters())

    def freeze_all_but_projector(self) -> None:
        if self._flags:  # already frozen (setup, then fit start)
            return
        self._flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        trainable = {id(p) for p in self.projector_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)

    def unfreeze(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))

    def setup(self, stage: str) -> None:
        self.freeze_all_but_projector()  # before a DDP wrapper is built: it only tracks the projector

    def on_fit_start(self):
        self.freeze_all_but_projector()

    def on_fit_end(self):
        self.bank.restore(self.model)
        self.unfreeze()

    def training_step(self, batch, batch_idx):
        self.model.eval()  # no dropout: the round is deterministic
        optimizer = self.optimizers()
        optimizer.zero_grad()
        projector = projector_module(self.model)
        captured: list[tuple[tuple, torch.Tensor]] = []

        def to_leaf(module, args, output):  # the rest of the model sees a leaf; its gradient is kept
            leaf = output.detach().requires_grad_(True)
            captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), leaf))
            return leaf

        total = 0.0
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        handle = projector.register_forward_hook(to_leaf)
        try:
            with torch.enable_grad():
                for policy in self.policies:
                    self.bank.assemble(self.model, policy)
                    loss = round_loss(self.model, inputs, batch) / len(self.policies)
                    loss.backward()  # reaches only the leaf: everything before the projector's output is frozen
                    total += float(loss.detach())
        finally:
            handle.remove()
        with torch.enable_grad():
            surrogate = sum((projector(*args) * leaf.grad).sum() for args, leaf in captured)
        self.manual_backward(surrogate)  # d(mean loss)/d(projector), in one backward (all-reduced under DDP)
        optimizer.step()
        self.losses.append(total)
        self.log("projector/loss", total, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.projector_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def train_dataloader(self):
        return DataLoader(_Batches(self.batches), batch_size=None, shuffle=False)


def train_projector(model, bank, policies: list[dict], batches: list[dict], steps: int = 10, lr: float = 1e-3,
                    weight_decay: float = 0.0, logger=False, devices=None, strategy: str = "auto") -> list[float]:
    """One projector round under a Lightning Trainer; returns the loss per step (this process's share under DDP).
    The model ends dense. `devices`/`strategy`: several devices (e.g. 2, "ddp"); default: the model's device."""
    if steps < 1:
        return []
    device = next(model.parameters()).device
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    module = ProjectorTuner(model, bank, policies, batches, lr, weight_decay)
    if devices is None:
        devices = [device.index or 0] if device.type == "cuda" else 1
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        max_steps=int(steps),
        max_epochs=-1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(module)
    finally:  # also after an error: dense weights and the original requires_grad flags come back
        model.to(device)  # Lightning's teardown moves the module to the CPU
        bank.restore(model)
        if module._flags:
            module.unfreeze()
        model.eval()
    return module.losses
