"""Evaluation and projector optimization under Lightning DDP with two CPU processes (gloo): every record counts
once although the sampler repeats one, both processes agree, and the projector step equals one taken with the mean
of the two batches' gradients."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_evaluation_and_projector_round(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_worker import setup

    from efficientllava.evaluation import evaluate, evaluate_open
    from efficientllava.projector import projector_module

    model, processor, records, vizwiz, bank, batches, policies = setup(str(tmp_path / "hf_reference"))
    # multiple choice: 9 records, each once, as one process scores them
    for r in ranks:
        assert r["choice"]["n"] == 9
        assert r["choice"]["acc"] == pytest.approx(evaluate(model, processor, records)["acc"])
        assert r["choice"]["acc_ll"] == pytest.approx(evaluate(model, processor, records, mode="likelihood")["acc"])
    # open-ended: every question answered once, the same answers as one process gives
    summary, rows = evaluate_open(model, processor, vizwiz, max_new_tokens=3)
    for r in ranks:
        assert [p["prediction"] for p in r["predictions"]] == [row["prediction"] for row in rows]
        assert r["open"]["acc"] == pytest.approx(summary["acc"]) and r["open"]["n"] == len(vizwiz)

    # projector: both processes hold the same weights, those of one AdamW step on the mean gradient
    assert ranks[0]["projector"] == ranks[1]["projector"]
    projector = projector_module(model)
    params = dict(projector.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        for policy in policies:  # the plain way: one full backward per policy, gradients summed
            bank.assemble(model, policy)
            (model(**inputs, labels=batch["labels"]).loss / len(policies)).backward()
        for n, p in params.items():
            grads[n] += p.grad / len(batches)
    bank.restore(model)
    expected = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    for n, p in expected.items():
        p.grad = grads[n]
    torch.optim.AdamW(list(expected.values()), lr=1e-2, weight_decay=0.0).step()
    for n, p in expected.items():
        got = torch.tensor(ranks[0]["projector"][n])
        assert torch.allclose(got, p.detach(), atol=1e-6), n
        assert not torch.allclose(got, params[n].detach()), n  # it moved
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each process saw its own batch
