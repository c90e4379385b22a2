"""The synthetic "shapes world": scenes of 1-3 coloured shapes in the quadrants of a small canvas.

Pure and deterministic: a scene is a frozen description (including the seed of its background noise)
and ``Scene.render()`` draws it. Scenes are sampled in the main process (sequentially, from one
seeded ``random.Random``) and rendered in the encoding workers.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235),
    "yellow": (240, 220, 40), "purple": (150, 60, 210), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SIZE_FRACTION = {"small": 0.22, "large": 0.40}  # of the canvas side
MAX_OBJECTS = 3
COLOR_JITTER = 12  # +- per channel on object colours
NOISE_STD = 2.0  # background/object pixel noise
JITTER = 0.35  # of the free room around an object in its quadrant


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    quadrant: str
    dx: float = 0.0  # jitter of the centre in units of JITTER x the free room in the quadrant (-1..1)
    dy: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    def describe(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "quadrant": self.quadrant}


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    canvas: int
    background: tuple[int, int, int]
    noise_seed: int

    def signature(self) -> tuple:
        """What a caption can say about the scene (ignores jitter, tint and background)."""
        return tuple(sorted((o.quadrant, o.size, o.color, o.shape) for o in self.objects))

    def describe(self) -> list[dict]:
        return [o.describe() for o in sorted(self.objects, key=lambda o: QUADRANTS.index(o.quadrant))]

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.canvas, self.canvas), self.background)
        draw = ImageDraw.Draw(img)
        for obj in self.objects:
            _draw_object(draw, obj, self.canvas)
        rng = np.random.default_rng(self.noise_seed)
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (self.canvas, self.canvas, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, canvas: int) -> None:
    half = canvas / 2
    side = SIZE_FRACTION[obj.size] * canvas
    room = JITTER * max(0.0, (half - side) / 2 - 1)
    col, row = QUADRANTS.index(obj.quadrant) % 2, QUADRANTS.index(obj.quadrant) // 2
    cx = col * half + half / 2 + obj.dx * room
    cy = row * half + half / 2 + obj.dy * room
    r = side / 2
    fill = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLORS[obj.color], obj.tint))
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj.shape == "cross":
        w = r / 2.6
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


ObjFilter = Callable[[str, str], bool]  # (shape, color) -> allowed


def sample_object(rng: random.Random, quadrant: str, allowed: ObjFilter = lambda s, c: True,
                  shape: str | None = None, color: str | None = None) -> Obj:
    """An object in `quadrant`; unspecified attributes drawn uniformly among those `allowed`."""
    choices = [(s, c) for s in SHAPES for c in COLORS
               if (shape is None or s == shape) and (color is None or c == color) and allowed(s, c)]
    if not choices:
        raise ValueError(f"no object satisfies shape={shape} color={color} and the filter")
    s, c = rng.choice(choices)
    tint = tuple(rng.randint(-COLOR_JITTER, COLOR_JITTER) for _ in range(3))
    return Obj(shape=s, color=c, size=rng.choice(SIZES), quadrant=quadrant,
               dx=rng.uniform(-1, 1), dy=rng.uniform(-1, 1), tint=tint)


def make_scene(rng: random.Random, objects: list[Obj], canvas: int) -> Scene:
    """Wrap objects (distinct quadrants) with a random dark background and a noise seed."""
    quadrants = [o.quadrant for o in objects]
    assert len(set(quadrants)) == len(quadrants) and 1 <= len(objects) <= MAX_OBJECTS, quadrants
    base = rng.randint(25, 70)
    background = tuple(base + rng.randint(-8, 8) for _ in range(3))
    return Scene(objects=tuple(objects), canvas=canvas, background=background, noise_seed=rng.getrandbits(32))


def free_quadrants(rng: random.Random, taken: list[str], count: int) -> list[str]:
    return rng.sample([q for q in QUADRANTS if q not in taken], count)


def random_scene(rng: random.Random, canvas: int, num_objects: int | None = None) -> Scene:
    """A scene of 1-3 (uniform) objects, attributes uniform and independent, in distinct quadrants."""
    n = num_objects or rng.randint(1, MAX_OBJECTS)
    return make_scene(rng, [sample_object(rng, q) for q in free_quadrants(rng, [], n)], canvas)
