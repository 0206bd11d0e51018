"""Run by tests/test_ddp.py as `python tests/ddp_worker.py OUT_DIR`: Lightning's DDP launcher starts a second
process (CPU, gloo). Both evaluate 9 toy records (multiple choice; the distributed sampler repeats one of them),
answer 4 VizWiz-schema questions, and train the projector for one step on two batches (one per process); each
process writes what it got to OUT_DIR/rank<r>.json."""
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from efficientllava.data.benchmarks import load_benchmark
from efficientllava.evaluation import MultipleChoiceEvaluator, OpenEndedEvaluator
from efficientllava.projector import projector_module, train_projector
from efficientllava.pruning import PruningBank, select_layers
from efficientllava.pruning.toy_calibration import toy_records
from efficientllava.toy_model import build_toy_llava

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def ddp_trainer():
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)


def setup(cache_dir):
    """What every process (and the single-process reference in the test) builds identically."""
    from efficientllava.data.collate import Collator

    model, processor = build_toy_llava(seed=0)
    model.eval()
    records = toy_records(9, "test")
    vizwiz = load_benchmark("vizwiz", str(FIXTURES / "vizwiz"),
                            data_files={"train": "Annotations/train.json", "val": "Annotations/val.json"},
                            image_root=str(FIXTURES / "vizwiz" / "{split}"), cache_dir=cache_dir)["val"]
    calibration = toy_records(8, "val")
    collator = Collator(processor)
    names = list(select_layers(model))
    bank = PruningBank.build(model, names, [0.0, 0.5, 0.7], "wanda",
                             [collator.prompts(calibration[:4], ["letter"] * 4)])
    batches = [collator.answers(calibration[i : i + 4], ["letter"] * 4) for i in (0, 4)]
    policies = [{n: 0.5 for n in names}, {n: 0.7 for n in names}]
    return model, processor, records, list(vizwiz), bank, batches, policies


def main(out: Path):
    model, processor, records, vizwiz, bank, batches, policies = setup(str(out / f"hf_{os.getpid()}"))
    categories = sorted({r["category"] for r in records})
    choice = MultipleChoiceEvaluator(model, processor, categories, modes=["letter", "likelihood"])
    trainer = ddp_trainer()
    trainer.test(choice, DataLoader(records, batch_size=2, collate_fn=list), verbose=False)
    seen = {"choice_ids_here": sorted(choice.tally.records)}  # emptied by compute; kept for the record
    open_ended = OpenEndedEvaluator(model, processor, max_new_tokens=3)
    ddp_trainer().test(open_ended, DataLoader(vizwiz, batch_size=1, collate_fn=list), verbose=False)
    losses = train_projector(model, bank, policies, batches, steps=1, lr=1e-2, devices=2, strategy="ddp")
    state = {k: v.tolist() for k, v in projector_module(model).state_dict().items()}
    result = {"rank": trainer.global_rank, "world": trainer.world_size, "choice": choice.results,
              "open": open_ended.results, "predictions": open_ended.predictions, "losses": losses,
              "projector": state, **seen}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
