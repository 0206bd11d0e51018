"""The toy visual multiple-choice benchmark, built deterministically from a seed in the project's schema.

Seven categories by default, all of which need the image: colour, shape, counting, position, relation ("what is
directly left of the red circle?"), digit (scikit-learn's handwritten digits) and the compositional digit_sum ("what
is the sum of the two digits?"). On request (`relation_form`, `categories`) it also builds what the benchmark asked
before version 3: relation as a yes/no comparison ("is the red circle left of the blue square?") and the
compositional count_relation ("how many objects are left of the red circle?"). Distractor options are drawn near the
answer where answers are numbers, and among the scene's other objects where answers name one, so picking the right
letter needs the same work as producing the answer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from efficientllava.data.scenes import COLOURS, PLURALS, SHAPES, Obj, describe, digit_pools, render
from efficientllava.data.schema import FEATURES

log = logging.getLogger(__name__)

BENCHMARK_VERSION = 3
CATEGORIES = ("colour", "shape", "counting", "position", "relation", "digit", "count_relation", "digit_sum")
DEFAULT_CATEGORIES = tuple(c for c in CATEGORIES if c != "count_relation")
DEFAULT_RELATION_FORM = "neighbour"
DEFAULT_SIZES = {"train": 30000, "val": 1000, "test": 2000}
RELATIONS = ("left of", "right of", "above", "below")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COLOUR_NAMES = tuple(COLOURS)
OBJECT_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


class _Scene:
    """Places objects in distinct cells of the grid."""

    def __init__(self, rng: np.random.Generator, pool: str, relations: tuple[str, ...] = RELATIONS):
        self.rng, self.pool, self.relations = rng, pool, relations
        self.free = [int(c) for c in rng.permutation(16)]
        self.objects: list[Obj] = []

    def add_shape(self, shape: str, colour: str, cell: int | None = None) -> Obj:
        cell = self.free.pop() if cell is None else self._take(cell)
        obj = Obj(shape, colour, cell // 4, cell % 4)
        self.objects.append(obj)
        return obj

    def add_digit(self) -> Obj:
        images, labels = digit_pools()[self.pool]
        index = int(self.rng.integers(len(images)))
        cell = self.free.pop()
        obj = Obj("digit", None, cell // 4, cell % 4, value=int(labels[index]), image_index=index)
        self.objects.append(obj)
        return obj

    def add_random_shapes(self, n: int, colours=COLOUR_NAMES, shapes=SHAPES) -> list[Obj]:
        return [self.add_shape(self._pick(shapes), self._pick(colours)) for _ in range(n)]

    def _take(self, cell: int) -> int:
        self.free.remove(cell)
        return cell

    def _pick(self, options):
        return options[int(self.rng.integers(len(options)))]


def _others(options, *exclude):
    return tuple(o for o in options if o not in exclude)


def _holds(a: Obj, relation: str, b: Obj) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def _colour(s: _Scene):
    shape = s._pick(SHAPES)
    target = s.add_shape(shape, s._pick(COLOUR_NAMES))
    s.add_random_shapes(int(s.rng.integers(1, 5)), shapes=_others(SHAPES, shape))
    return f"What color is the {shape}?", target.colour, COLOUR_NAMES


def _shape(s: _Scene):
    colour = s._pick(COLOUR_NAMES)
    target = s.add_shape(s._pick(SHAPES), colour)
    s.add_random_shapes(int(s.rng.integers(1, 5)), colours=_others(COLOUR_NAMES, colour))
    return f"What shape is the {colour} object?", target.kind, SHAPES


def _counting(s: _Scene):
    count = int(s.rng.integers(0, 5))
    if s.rng.random() < 0.5:
        colour = s._pick(COLOUR_NAMES)
        s.add_random_shapes(count, colours=(colour,))
        s.add_random_shapes(int(s.rng.integers(0 if count else 1, 4)), colours=_others(COLOUR_NAMES, colour))
        question = f"How many {colour} objects are there?"
    else:
        shape = s._pick(SHAPES)
        s.add_random_shapes(count, shapes=(shape,))
        s.add_random_shapes(int(s.rng.integers(0 if count else 1, 4)), shapes=_others(SHAPES, shape))
        question = f"How many {PLURALS[shape]} are there?"
    return question, str(count), tuple(str(i) for i in range(7))


def _position(s: _Scene):
    colour, shape = s._pick(COLOUR_NAMES), s._pick(SHAPES)
    target = s.add_shape(shape, colour)
    s.add_random_shapes(int(s.rng.integers(0, 4)), colours=_others(COLOUR_NAMES, colour))
    answer = QUADRANTS[2 * (target.row >= 2) + (target.col >= 2)]
    return f"Where is the {colour} {shape}?", answer, QUADRANTS


def _relation(s: _Scene):
    ca, cb = (str(c) for c in s.rng.choice(COLOUR_NAMES, size=2, replace=False))
    relation = s._pick(s.relations)
    horizontal = relation in ("left of", "right of")
    while True:  # the two objects must differ along the asked axis
        cells = [int(c) for c in s.rng.choice(16, size=2, replace=False)]
        a, b = (divmod(c, 4) for c in cells)
        if (a[1] != b[1]) if horizontal else (a[0] != b[0]):
            break
    obj_a = s.add_shape(s._pick(SHAPES), ca, cells[0])
    obj_b = s.add_shape(s._pick(SHAPES), cb, cells[1])
    s.add_random_shapes(int(s.rng.integers(0, 3)), colours=_others(COLOUR_NAMES, ca, cb))
    answer = "yes" if _holds(obj_a, relation, obj_b) else "no"
    return f"Is the {obj_a.name} {relation} the {obj_b.name}?", answer, ("yes", "no")


NEIGHBOURS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def _neighbour(s: _Scene):
    """"What is directly left of the red circle?": the object in the adjacent cell, named by colour and shape; the
    scene's other objects are the first distractors, so the relation word decides between objects that are there."""
    relation = s._pick(s.relations)
    dr, dc = NEIGHBOURS[relation]
    cells = [c for c in s.free if 0 <= c // 4 + dr < 4 and 0 <= c % 4 + dc < 4]
    cell = cells[int(s.rng.integers(len(cells)))]
    colour = s._pick(COLOUR_NAMES)
    ref = s.add_shape(s._pick(SHAPES), colour, cell)
    others = _others(COLOUR_NAMES, colour)
    target = s.add_shape(s._pick(SHAPES), s._pick(others), (ref.row + dr) * 4 + ref.col + dc)
    s.add_random_shapes(int(s.rng.integers(1, 4)), colours=others)
    near = [o.name for o in s.objects if o is not ref and o.name != target.name]
    return f"What is directly {relation} the {ref.name}?", target.name, OBJECT_NAMES, near


def _digit(s: _Scene):
    target = s.add_digit()
    s.add_random_shapes(int(s.rng.integers(0, 3)))
    return "What digit is shown?", str(target.value), tuple(str(i) for i in range(10))


def _count_relation(s: _Scene):
    colour = s._pick(COLOUR_NAMES)
    ref = s.add_shape(s._pick(SHAPES), colour)
    others = s.add_random_shapes(int(s.rng.integers(1, 7)), colours=_others(COLOUR_NAMES, colour))
    relation = s._pick(s.relations)
    count = sum(_holds(o, relation, ref) for o in others)
    return f"How many objects are {relation} the {ref.name}?", str(count), tuple(str(i) for i in range(7))


def _digit_sum(s: _Scene):
    a, b = s.add_digit(), s.add_digit()
    s.add_random_shapes(int(s.rng.integers(0, 2)))
    return "What is the sum of the two digits?", str(a.value + b.value), tuple(str(i) for i in range(19))


GENERATORS: dict[str, Callable] = {
    "colour": _colour,
    "shape": _shape,
    "counting": _counting,
    "position": _position,
    "relation": _relation,
    "digit": _digit,
    "count_relation": _count_relation,
    "digit_sum": _digit_sum,
}
# how the relation category asks: "What is directly left of the red circle?" (the adjacent object's name; the
# default since version 3) or "Is the red circle left of the blue square?" (yes/no; version 2)
RELATION_FORMS = {"yes_no": _relation, "neighbour": _neighbour}
HINTS = {"digit": "The digits are handwritten.", "digit_sum": "The digits are handwritten."}
NUMERIC = {"counting", "digit", "count_relation", "digit_sum"}


def _choices(rng: np.random.Generator, category: str, answer: str, space: tuple[str, ...], near=()):
    """2-5 options holding the answer at a uniformly drawn position; numeric distractors lie near the answer, and
    `near` (other answers the scene makes plausible) are drawn before the rest of the space."""
    k = int(rng.integers(2, min(5, len(space)) + 1))
    near = list(dict.fromkeys(o for o in near if o != answer))
    distractors = [o for o in space if o != answer and o not in near]
    if category in NUMERIC:
        weights = np.array([1.0 / (abs(int(o) - int(answer)) ** 1.5) for o in distractors])
    else:
        weights = np.ones(len(distractors))
    first = [near[i] for i in rng.permutation(len(near))[: k - 1]] if near else []
    picked = rng.choice(len(distractors), size=k - 1 - len(first), replace=False, p=weights / weights.sum())
    options = first + [distractors[i] for i in picked]
    position = int(rng.integers(k))
    options.insert(position, answer)
    return options, position


def check_relations(relations) -> tuple[str, ...]:
    """The relation words the relation and count_relation questions ask: a non-empty subset of RELATIONS
    (None: all four)."""
    if relations is None:
        return RELATIONS
    relations = tuple(str(r) for r in relations)
    unknown = [r for r in relations if r not in RELATIONS]
    if not relations or unknown or len(set(relations)) != len(relations):
        raise ValueError(
            f"toy benchmark relations {list(relations)} are not a non-empty list of distinct relation words; "
            f"expected some of {list(RELATIONS)} (or null for all)"
        )
    return relations


def check_categories(categories) -> tuple[str, ...]:
    """The categories a build asks for: a non-empty list of distinct CATEGORIES (None: DEFAULT_CATEGORIES)."""
    if categories is None:
        return DEFAULT_CATEGORIES
    categories = tuple(str(c) for c in categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if not categories or unknown or len(set(categories)) != len(categories):
        raise ValueError(f"toy benchmark categories {list(categories)} are not a non-empty list of distinct "
                         f"category names; expected some of {list(CATEGORIES)} (or null for {list(DEFAULT_CATEGORIES)})")
    return categories


def check_relation_form(form: str) -> str:
    if form not in RELATION_FORMS:
        raise ValueError(f"toy benchmark relation_form={form!r} is unknown; expected one of {list(RELATION_FORMS)}")
    return form


def check_train_mix(mix, categories) -> dict[str, float] | None:
    """Relative weights of the categories in the train split ({category: weight > 0}; unnamed categories weigh 1;
    None: every category equally often)."""
    if mix is None:
        return None
    mix = {str(k): v for k, v in dict(mix).items()}
    unknown = sorted(set(mix) - set(categories))
    bad = {k: v for k, v in mix.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0}
    if unknown or bad:
        raise ValueError(f"toy benchmark train_mix {mix} names categories {unknown} not built or weights {bad} not "
                         f"> 0; expected {{category: weight > 0}} over {list(categories)}")
    return {k: float(mix.get(k, 1.0)) for k in categories}


def _category_order(rng: np.random.Generator, n: int, kinds: tuple[str, ...], mix: dict[str, float] | None):
    """The category of each of n records: each kind equally often, or in proportion to `mix`, in random order."""
    if mix is None:
        return [kinds[i % len(kinds)] for i in rng.permutation(n)]
    weights = np.array([mix[k] for k in kinds])
    counts = np.floor(n * weights / weights.sum()).astype(int)
    counts[np.argsort(-(n * weights / weights.sum() - counts), kind="stable")[: n - counts.sum()]] += 1
    order = np.repeat(np.arange(len(kinds)), counts)
    return [kinds[i] for i in order[rng.permutation(n)]]


def generate_split(split: str, n: int, seed: int, relations=None, relation_form: str = DEFAULT_RELATION_FORM,
                   categories=None, train_mix=None) -> dict[str, list]:
    """n records of one split; the same (split, n, seed, relations, relation_form, categories, train_mix) always
    gives the same records. `train_mix` weighs the categories of the train split only (val and test keep every
    category equally often)."""
    relations = check_relations(relations)
    kinds = check_categories(categories)
    mix = check_train_mix(train_mix, kinds) if split == "train" else None
    generators = {**GENERATORS, "relation": RELATION_FORMS[check_relation_form(relation_form)]}
    offset = {"train": 0, "val": 1, "test": 2}[split]
    rng = np.random.default_rng([seed, offset])
    pool = "train" if split == "train" else "heldout"
    categories = _category_order(rng, n, kinds, mix)
    columns: dict[str, list] = {k: [] for k in FEATURES}
    for i, category in enumerate(categories):
        scene = _Scene(rng, pool, relations)
        question, answer, space, *near = generators[category](scene)
        choices, position = _choices(rng, category, answer, space, *near)
        columns["id"].append(f"toy-{split}-{i:06d}")
        columns["image"].append(render(scene.objects, pool, rng))
        columns["question"].append(question)
        columns["choices"].append(choices)
        columns["answer"].append(position)
        columns["hint"].append(HINTS.get(category, ""))
        columns["lecture"].append(describe(scene.objects))
        columns["category"].append(category)
        columns["split"].append(split)
    return columns


def default_cache_dir() -> Path:
    root = os.environ.get("EFFICIENTLLAVA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "efficientllava"


def build_toy_benchmark(
    seed: int = 0, sizes: dict[str, int] | None = None, cache_dir: str | Path | None = None, relations=None,
    relation_form: str = DEFAULT_RELATION_FORM, categories=None, train_mix=None,
):
    """The benchmark as a `datasets.DatasetDict`, cached on disk under a key of its version, seed, sizes and any
    option that is not the default. `relations` (default: all four) restricts the relation words the relation and
    count_relation questions ask, e.g. one direction per axis; `relation_form`, `categories` and `train_mix`: see
    RELATION_FORMS, check_categories and check_train_mix."""
    import datasets
    from PIL import Image

    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    for split, n in sizes.items():
        if split not in DEFAULT_SIZES:
            raise ValueError(f"toy benchmark split {split!r} is unknown; expected one of {sorted(DEFAULT_SIZES)}")
        if int(n) < 1:
            raise ValueError(f"toy benchmark split {split!r} asks for {n} records; expected at least 1")
    relations = check_relations(relations)
    kinds = check_categories(categories)
    parts = [BENCHMARK_VERSION, seed, sorted(sizes.items())]
    if relations != RELATIONS:  # the defaults add nothing to the key
        parts.append(list(relations))
    mix = check_train_mix(train_mix, kinds)
    if check_relation_form(relation_form) != DEFAULT_RELATION_FORM or kinds != DEFAULT_CATEGORIES or mix is not None:
        parts.append({"relation_form": relation_form, "categories": list(kinds), "train_mix": mix})
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"toy_benchmark-{key}"
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    splits = {}
    for split, n in sizes.items():
        columns = generate_split(split, int(n), seed, relations, relation_form, kinds, mix)
        columns["image"] = [Image.fromarray(a) for a in columns["image"]]
        splits[split] = datasets.Dataset.from_dict(columns, features=FEATURES)
    dataset = datasets.DatasetDict(splits)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    dataset.save_to_disk(str(tmp))  # written aside, then renamed: a crash never leaves a half-written cache
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        pass
    log.info("toy benchmark (seed %d, %s, relations %s) cached at %s", seed, sizes, list(relations), path)
    return datasets.load_from_disk(str(path))
