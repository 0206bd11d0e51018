import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from efficientllava.data.collate import IGNORE
from efficientllava.data.datamodule import FormatCurriculum
from efficientllava.outputs import atomic_directory
from efficientllava.training import per_sample_loss

ROOT = Path(__file__).resolve().parents[1]


def test_per_sample_loss_weights_samples_equally():
    logits = torch.zeros(2, 4, 3)
    logits[0, 0, 1] = 5.0  # sample 0 predicts its single label well
    labels = torch.full((2, 4), IGNORE)
    labels[0, 1] = 1
    labels[1, 1:] = torch.tensor([0, 0, 0])  # sample 1: three uniform-guess tokens
    loss = per_sample_loss(logits, labels)
    assert loss.shape == (2,)
    assert loss[1] == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)
    assert loss[0] < 0.05


def test_format_curriculum_follows_the_step():
    curriculum = FormatCurriculum([(0, {"short": 1.0}), (10, {"short": 1.0, "letter": 1.0})], seed=0)
    assert set(curriculum.formats(64)) == {"short"}
    curriculum.step = 10
    picks = curriculum.formats(256)
    assert set(picks) == {"short", "letter"} and 80 < picks.count("letter") < 176
    assert curriculum.formats(256) == picks  # seeded by (seed, step)


@pytest.mark.parametrize(
    "stages, message",
    [([(5, {"short": 1})], "start at step 0"), ([(0, {"essay": 1})], "answer format 'essay'"), ([(0, {"short": 0})], "not all 0")],
)
def test_format_curriculum_bad_input(stages, message):
    with pytest.raises(ValueError, match=message):
        FormatCurriculum(stages)


def test_interrupted_output_never_looks_complete(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed mid-save")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").exists()


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_train_then_evaluate_the_saved_checkpoint(tmp_path):
    tiny = ["data.build.sizes={train:96,val:32,test:48}", f"+data.build.cache_dir={tmp_path}/cache", "data.n_val=16",
            "data.batch_size=8", "logger=csv"]
    out = run(["stages.scenes.steps=2", "stages.align.steps=1", "stages.joint.steps=2", "trainer.val_check_interval=4", *tiny, f"hydra.run.dir={tmp_path}/train"], ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 48 and 0 <= metrics["test"]["acc"] <= 100
    assert metrics["host_heap"].startswith(("steady heap", "allocator left alone (no glibc"))
    saved = tmp_path / "train" / "toy_llava"
    assert (saved / "model.safetensors").exists() and (saved / "chat_template.jinja").exists()
    out = run(["eval_only=true", f"model.path={saved}", *tiny, f"hydra.run.dir={tmp_path}/eval"], ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["acc"] == pytest.approx(metrics["test"]["acc"])  # same weights, same records, same score


@pytest.mark.slow
def test_eval_only_with_a_missing_checkpoint_fails_clearly(tmp_path):
    out = run(["eval_only=true", "model.path=/no/such/llava", "logger=csv", f"hydra.run.dir={tmp_path}/eval"], ROOT)
    assert out.returncode != 0
    assert "does not exist; expected a local LLaVA checkpoint directory" in out.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("steady_heap_mib=64", "steady_heap_mib: steady heap threshold is 64 MiB; expected an integer from 1 to 32"),
        # the toy train.py builds takes the model config's attention kernels
        ("model.attn_implementation=fastest", "attn_implementation='fastest' is not available for the toy LLaVA"),
    ],
)
def test_a_bad_setting_fails_before_training(tmp_path, override, message):
    out = run([override, "logger=csv", f"hydra.run.dir={tmp_path}/train"], ROOT)
    assert out.returncode != 0
    assert message in out.stderr
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_a_training_batch_moves_its_tensors_and_leaves_its_records_alone():
    from efficientllava.data.datamodule import BenchmarkDataModule

    data = BenchmarkDataModule(lambda: None)
    records = [{"id": "a", "image": {"bytes": b"png"}, "choices": ["x", "y"]}]
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "records": records}
    moved = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["records"] is records and moved["input_ids"].device.type == "meta"
    evaluation = data.transfer_batch_to_device([{"id": "b", "x": torch.zeros(2)}], torch.device("meta"), 0)
    assert evaluation[0]["x"].device.type == "meta"  # evaluation batches: Lightning's own transfer


def test_training_scalars_are_logged_on_the_steps_the_loggers_write(tiny_toy):
    from types import SimpleNamespace

    from efficientllava.training import LlavaTrainingModule

    module = LlavaTrainingModule(*tiny_toy, ["colour"])
    logged = []
    module.log = lambda name, value, **kwargs: logged.append((module.global_step, name))
    for step in range(12):
        module._trainer = SimpleNamespace(log_every_n_steps=5, global_step=step)
        module.log_step("train/loss", 1.0)
    assert logged == [(4, "train/loss"), (9, "train/loss")]
    module._trainer = None
    module.log_step("train/loss", 2.0)  # outside a Trainer every call goes through (Lightning decides what to do)
    assert logged[-1] == (0, "train/loss")
