"""Rendering of the toy benchmark's scenes: a 4x4 grid of 8x8-pixel cells, each empty or holding one object.

An object is either a coloured shape or a handwritten digit from scikit-learn's bundled digits set (real
handwriting, 8x8 grey levels). Cells align with the toy vision tower's 8x8 patches, so recognising an object is
the vision tower's job and relating objects to one another (counting, comparing, adding) is the language model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

GRID = 4
CELL = 8
IMAGE_SIZE = GRID * CELL

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 40),
    "purple": (165, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


def _shape_masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    centre = (CELL - 1) / 2
    masks = {
        "circle": (yy - centre) ** 2 + (xx - centre) ** 2 <= 3.2**2,
        "square": (yy >= 1) & (yy <= 6) & (xx >= 1) & (xx <= 6),
        # apex at the top, base on row 6
        "triangle": (yy >= 1) & (yy <= 6) & (np.abs(xx - centre) <= (yy - 0.5) / 2 + 0.01),
        "cross": ((np.abs(yy - centre) <= 1) & (xx >= 1) & (xx <= 6))
        | ((np.abs(xx - centre) <= 1) & (yy >= 1) & (yy <= 6)),
    }
    return {k: v.astype(bool) for k, v in masks.items()}


SHAPE_MASKS = _shape_masks()


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1,797 digits, split by index so test and val scenes use handwriting never seen in training."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype(np.uint8)
    held_out = np.arange(len(images)) % 5 == 0
    return {
        "train": (images[~held_out], digits.target[~held_out]),
        "heldout": (images[held_out], digits.target[held_out]),
    }


@dataclass(frozen=True)
class Obj:
    kind: str  # a shape name or "digit"
    colour: str | None
    row: int
    col: int
    value: int | None = None  # the digit shown
    image_index: int | None = None  # index into the digit pool

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def render(objects: list[Obj], pool: str, rng: np.random.Generator) -> np.ndarray:
    """Draw objects on a black 32x32 RGB canvas; shape colours get a small random jitter."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images = digit_pools()[pool][0]
    for obj in objects:
        y, x = obj.row * CELL, obj.col * CELL
        if obj.kind == "digit":
            canvas[y : y + CELL, x : x + CELL, :] = images[obj.image_index][:, :, None]
        else:
            colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-20, 21, size=3), 0, 255)
            cell = canvas[y : y + CELL, x : x + CELL]
            cell[SHAPE_MASKS[obj.kind]] = colour.astype(np.uint8)
    return canvas


def describe(objects: list[Obj]) -> str:
    """The scene cell by cell in reading order ("empty", "red circle", "digit 7", ...): a dense caption used as
    the stage-1 alignment target when training the toy, as LLaVA pre-aligns its projector on captions."""
    cells = ["empty"] * (GRID * GRID)
    for obj in objects:
        cells[obj.row * GRID + obj.col] = f"digit {obj.value}" if obj.kind == "digit" else obj.name
    return " , ".join(cells)
