import os

# Tests never touch the network: no hub, no W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy():
    """The shipped toy LLaVA and its processor, loaded once."""
    from efficientllava.models import TOY_MODEL_DIR, load_llava

    return load_llava(TOY_MODEL_DIR, device="cpu")


@pytest.fixture(scope="session")
def tiny_toy():
    """A randomly initialised toy LLaVA a few times smaller than the shipped one, and its processor (for tests that
    need the toy's tokenizer and image processor, or any model to wrap)."""
    from efficientllava.toy_model import ToyArchitecture, build_toy_llava

    return build_toy_llava(ToyArchitecture(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32,
                                           vision_layers=1, vision_heads=2, vision_intermediate=64), seed=0)


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory):
    from efficientllava.data.toy_benchmark import build_toy_benchmark

    return build_toy_benchmark(0, {"train": 64, "val": 64, "test": 160}, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def test_records():
    """The first 200 records of the real toy test split (generated in memory, no cache needed)."""
    from PIL import Image

    from efficientllava.data.toy_benchmark import generate_split

    cols = generate_split("test", 200, 0)
    cols["image"] = [Image.fromarray(a) for a in cols["image"]]
    return [dict(zip(cols, row)) for row in zip(*cols.values())]


@pytest.fixture
def random_toy_dir(tmp_path):
    """A randomly initialised toy LLaVA saved with save_pretrained, for subprocess runs of the entry scripts."""
    from efficientllava.toy_model import build_toy_llava

    path = tmp_path / "toy"
    model, processor = build_toy_llava(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
