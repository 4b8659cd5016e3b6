"""Drawing the synthetic world's pictures: its visual vocabulary (shapes, motions, colours,
backgrounds) and the primitives that render an object over a textured background."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring", "bar", "star"]
#: Shapes only the items of a drift day have (``world.drift_ds``): new topics, unseen content.
DRIFT_SHAPES = ["hexagon", "moon", "arrow", "heart"]
#: Every shape an item can have: an item's shape index points into this list.
ALL_SHAPES = SHAPES + DRIFT_SHAPES
MOTIONS = ["left", "right", "up", "down", "down_right", "up_left", "up_right", "down_left"]
MOTION_VEC = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
              "down_right": (1, 1), "up_left": (-1, -1), "up_right": (1, -1),
              "down_left": (-1, 1)}
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230),
           "yellow": (240, 220, 40), "purple": (150, 50, 200), "orange": (250, 140, 20),
           "white": (245, 245, 245), "black": (15, 15, 15)}
COLOUR_NAMES = list(COLOURS)
BACKGROUNDS = ["grass", "sky", "sand", "night", "snow", "brick"]
#: Scenes only the items of a drift day have (``world.drift_ds``).
DRIFT_BACKGROUNDS = ["lava", "circuit"]
ALL_BACKGROUNDS = BACKGROUNDS + DRIFT_BACKGROUNDS


def _bg(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A textured background: most of the pixels, independent of the topic."""
    yy, xx = np.mgrid[0:size, 0:size]
    noise = rng.normal(0, 10, (size, size, 1))
    if kind == "grass":
        base = np.array([60, 150, 50]) + np.stack([0 * xx, 25 * ((xx % 4) < 2), 0 * xx], -1)
    elif kind == "sky":
        base = np.array([110, 170, 240]) + np.stack([yy, yy, 0 * yy], -1) * (60 / size)
    elif kind == "sand":
        base = np.array([220, 200, 140]) + noise * 2
    elif kind == "night":
        base = np.array([20, 20, 50]) + 200 * (rng.random((size, size, 1)) < 0.03)
    elif kind == "snow":
        base = np.array([235, 240, 250]) + noise
    elif kind == "lava":
        crack = rng.random((size, size, 1)) < 0.15
        base = np.where(crack, [255, 200, 40], [90, 15, 5]) + noise
    elif kind == "circuit":
        line = (((xx % 5) == 0) | ((yy % 7) == 0))[..., None]
        base = np.where(line, [180, 230, 120], [10, 60, 30])
    else:  # brick
        mortar = ((yy % 6) == 0) | (((xx + 3 * ((yy // 6) % 2)) % 8) == 0)
        base = np.where(mortar[..., None], [200, 200, 190], [170, 70, 50])
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int]) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "cross":
        w = max(r / 3, 1)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(int(r / 3), 1))
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=colour)
    elif shape == "hexagon":
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a))
                      for a in np.arange(6) * np.pi / 3], fill=colour)
    elif shape == "moon":
        draw.pieslice(box, 90, 270, fill=colour)
    elif shape == "arrow":
        w = r / 3
        draw.polygon([(cx - r, cy - w), (cx, cy - w), (cx, cy - r), (cx + r, cy), (cx, cy + r),
                      (cx, cy + w), (cx - r, cy + w)], fill=colour)
    elif shape == "heart":
        draw.ellipse([cx - r, cy - r, cx, cy], fill=colour)
        draw.ellipse([cx, cy - r, cx + r, cy], fill=colour)
        draw.polygon([(cx - r, cy - r / 2), (cx + r, cy - r / 2), (cx, cy + r)], fill=colour)
    else:  # star
        pts = []
        for j in range(10):
            ang = np.pi / 2 + j * np.pi / 5
            rr = r if j % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(ang), cy - rr * np.sin(ang)))
        draw.polygon(pts, fill=colour)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()
