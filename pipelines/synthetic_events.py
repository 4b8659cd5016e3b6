"""Untrimmed videos of several events one after another (the synthetic world's multi-event
items and the grounding set of the GMU model): each event an object crossing the frame, with
its caption and true span."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipelines.drawing import (ALL_SHAPES, BACKGROUNDS, COLOUR_NAMES, COLOURS, MOTION_VEC,
                               MOTIONS, SHAPES, _bg, _draw_shape)



@dataclass
class Event:
    """One event of an untrimmed video: steps [start, end] (inclusive) and its caption."""
    start: int
    end: int
    caption: str
    shape: int
    motion: int
    colour: int


def event_caption(colour: str, shape: str, motion: str) -> str:
    return f"a {colour} {shape} moves {motion.replace('_', ' ')}"


def plan_events(rng: np.random.Generator, frames: int, n_events: int,
                fixed: tuple[int, int, int] | None = None) -> list[Event]:
    """``n_events`` events one after another over ``frames`` steps (each at least 3 steps, idle
    gaps of 0-2 steps between some), of distinct (colour, shape) pairs; ``fixed`` (shape,
    motion, colour) is one of them, at a random position."""
    n_events = max(1, min(n_events, frames // 3))
    cuts = np.sort(rng.choice(np.arange(1, frames), n_events - 1, replace=False)) \
        if n_events > 1 else np.zeros(0, int)
    # Re-draw until every segment can hold an event of 3 steps.
    bounds = np.concatenate([[0], cuts, [frames]])
    while (np.diff(bounds) < 3).any():
        cuts = np.sort(rng.choice(np.arange(1, frames), n_events - 1, replace=False))
        bounds = np.concatenate([[0], cuts, [frames]])
    where = int(rng.integers(n_events))
    used, events = set(), []
    for k in range(n_events):
        a, b = int(bounds[k]), int(bounds[k + 1]) - 1
        gap = int(rng.integers(0, min(2, b - a - 2) + 1))          # idle steps before it
        a += gap
        if fixed is not None and k == where:
            shape, motion, colour = fixed
        else:
            while True:
                shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
                if (shape, colour) not in used and (fixed is None or (shape, colour) != (
                        fixed[0], fixed[2])):
                    break
            motion = int(rng.integers(len(MOTIONS)))
        used.add((shape, colour))
        events.append(Event(a, b, event_caption(COLOUR_NAMES[colour], ALL_SHAPES[shape],
                                                MOTIONS[motion]), shape, motion, colour))
    return events


def render_events(rng: np.random.Generator, events: list[Event], frames: int, size: int,
                  background: str) -> list[Image.Image]:
    """The video of ``events``: each object crosses the frame in its motion's direction during
    its steps; other steps show the background only."""
    bg = _bg(background, size, rng)
    out = [bg.copy() for _ in range(frames)]
    r = size * 0.18
    for ev in events:
        n = ev.end - ev.start + 1
        dx, dy = MOTION_VEC[MOTIONS[ev.motion]]
        step = (size - 2 * r) / max(n, 2) * 0.9
        x0 = size / 2 - dx * step * (n - 1) / 2
        y0 = size / 2 - dy * step * (n - 1) / 2
        for f in range(n):
            _draw_shape(ImageDraw.Draw(out[ev.start + f]), ALL_SHAPES[ev.shape],
                        x0 + dx * step * f, y0 + dy * step * f, r,
                        COLOURS[COLOUR_NAMES[ev.colour]])
    return out


def grounding_videos(seed: int, n: int, frames: int, size: int, events: tuple[int, int] = (2, 4)
                     ) -> tuple[list[np.ndarray], list[list[Event]]]:
    """``n`` untrimmed videos (arrays (frames, size, size, 3) uint8) with 2-4 events each, one
    after another, and their events (a grounding set for the GMU model; deterministic)."""
    videos, evs = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 11, i])
        plan = plan_events(rng, frames, int(rng.integers(events[0], events[1] + 1)))
        imgs = render_events(rng, plan, frames, size,
                             BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
        videos.append(np.stack([np.asarray(im) for im in imgs]))
        evs.append(plan)
    return videos, evs
