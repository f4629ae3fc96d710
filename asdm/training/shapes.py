"""A procedurally generated, captioned image set: simple scenes whose captions state what is in
them, so prompt adherence can be checked against the generator's own ground truth.

A scene holds one or two shapes (circle, square, triangle), each of one colour, in one region
of the image (left / right / top / bottom / center; two shapes never share a region), on a
plain light background. The caption names every shape: "a red circle on the left and a blue
square on the right". Everything is drawn with numpy from a seeded generator: the same seed
gives the same images and captions on any machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
          "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
REGIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
           "center": (0.5, 0.5)}   # centre (x, y) as fractions of the side
PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
# The classes a reader of these scenes predicts per region (the attribute checker, the embedded
# model's layout read-out): the regions in order, and each region's colour and kind, None = empty.
REGION_NAMES = list(REGIONS)
COLOR_CLASSES = [None] + list(COLORS)
KIND_CLASSES = [None] + list(SHAPES)
# regions that do not overlap, so two shapes never cover each other
_APART = [("left", "right"), ("top", "bottom")]


@dataclass(frozen=True)
class Item:
    shape: str
    color: str
    region: str


@dataclass
class Scene:
    image: np.ndarray      # H x W x 3, uint8
    caption: str
    items: tuple[Item, ...]


def caption_of(items) -> str:
    return " and ".join(f"a {i.color} {i.shape} {PHRASE[i.region]}" for i in items)


def targets(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, regions] class indices of each region's colour and kind (0 = empty)."""
    col = torch.zeros(len(scenes), len(REGION_NAMES), dtype=torch.long)
    kind = torch.zeros_like(col)
    for i, s in enumerate(scenes):
        for it in s.items:
            r = REGION_NAMES.index(it.region)
            col[i, r], kind[i, r] = COLOR_CLASSES.index(it.color), KIND_CLASSES.index(it.shape)
    return col, kind


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    # triangle, apex up: inside when below the two edges and above the base
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.58)


def draw(items, size: int, rng: np.random.Generator) -> np.ndarray:
    bg = np.array([235, 232, 225], np.float32) + rng.uniform(-8, 8, 3)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    for it in items:
        fx, fy = REGIONS[it.region]
        cx = fx * size + rng.uniform(-0.04, 0.04) * size
        cy = fy * size + rng.uniform(-0.04, 0.04) * size
        r = size * rng.uniform(0.14, 0.18)
        img[_mask(it.shape, size, cx, cy, r)] = np.array(COLORS[it.color], np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def scene(rng: np.random.Generator, size: int) -> Scene:
    if rng.random() < 0.5:
        items = (Item(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(REGIONS)))),)
    else:
        pair = _APART[rng.integers(len(_APART))]
        regions = pair if rng.random() < 0.5 else pair[::-1]
        colors = rng.choice(list(COLORS), size=2, replace=False)
        items = tuple(Item(str(rng.choice(SHAPES)), str(c), reg) for c, reg in zip(colors, regions))
    return Scene(draw(items, size, rng), caption_of(items), items)


def generate(n: int, size: int = 64, seed: int = 0) -> list[Scene]:
    """``n`` scenes of ``size`` x ``size`` pixels; scene i depends only on (seed, i)."""
    return [scene(np.random.default_rng([seed, i]), size) for i in range(n)]


def write_folder(folder: str, n: int, size: int = 64, seed: int = 0) -> list[Scene]:
    """The scenes as <i>.png with <i>.txt captions: the trainer's `data.images` layout."""
    os.makedirs(folder, exist_ok=True)
    scenes = generate(n, size, seed)
    for i, s in enumerate(scenes):
        Image.fromarray(s.image).save(os.path.join(folder, f"{i:05d}.png"))
        with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(s.caption + "\n")
    return scenes
