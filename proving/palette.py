"""The proving ground's vocabulary: named colours, backgrounds, shapes and position words.

One table serves the scene generator (what it may draw and how it names it) and the scorers (which
colour a decoded pixel is nearest to), so a caption word always means the same RGB value.
"""

from __future__ import annotations

import torch

# Object colours, chosen far apart in RGB (every pair is at least ~0.35 apart, and at least ~0.6 from
# every background) so nearest-colour segmentation stays unambiguous on imperfect decoded images.
OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.10, 0.80),
    "cyan": (0.10, 0.80, 0.85),
    "orange": (0.95, 0.50, 0.05),
}

BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
}

# Words a caption may use for the same colour; the canonical name is what scenes and scorers store.
COLOUR_SYNONYMS: dict[str, str] = {"magenta": "purple", "violet": "purple", "gray": "grey"}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# 3x3 cells of the frame, (row, col) -> the phrase a caption uses for an object placed there.
CELL_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
PHRASE_CELLS: dict[str, tuple[int, int]] = {v: k for k, v in CELL_PHRASES.items()}

# Pairwise relations: "A <relation> B".
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")


def palette_names() -> list[str]:
    """Every colour name the segmenter knows, objects first, then backgrounds."""
    return [*OBJECT_COLOURS, *BACKGROUND_COLOURS]


def palette_tensor(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB of :func:`palette_names`, shape ``[K, 3]``."""
    return torch.tensor([*OBJECT_COLOURS.values(), *BACKGROUND_COLOURS.values()], dtype=dtype)


def rgb(name: str) -> tuple[float, float, float]:
    """RGB of an object or background colour name (synonyms accepted)."""
    name = COLOUR_SYNONYMS.get(name, name)
    if name in OBJECT_COLOURS:
        return OBJECT_COLOURS[name]
    if name in BACKGROUND_COLOURS:
        return BACKGROUND_COLOURS[name]
    raise ValueError(f"unknown colour {name!r}: expected one of {palette_names()}")


def cell_of(x: float, y: float) -> tuple[int, int]:
    """The 3x3 cell (row, col) holding a normalised point."""
    return min(int(y * 3), 2), min(int(x * 3), 2)


def in_cell(x: float, y: float, cell: tuple[int, int], tolerance: float = 0.05) -> bool:
    """Whether a normalised point lies in a cell widened by ``tolerance``: a scorer must not fail an
    object whose centre was placed on a cell border and measured half a pixel across it."""
    row, col = cell
    return (col / 3 - tolerance <= x <= (col + 1) / 3 + tolerance) and (
        row / 3 - tolerance <= y <= (row + 1) / 3 + tolerance
    )
