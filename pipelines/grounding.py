"""Grounding data for the GMU model (``mm_encoder/gmu.py``): queries over untrimmed videos with
their true [start, end].

* :func:`synthetic_set`: untrimmed videos of the synthetic world's visual vocabulary, 2-4 events
  one after another, each with its caption ("a red circle moves left") and true span
  (``pipelines.synthetic.grounding_videos``); frame features from the item encoder's frozen
  image tower, token states from its text tower.
* :func:`read_charades_sta`: a Charades-STA annotation file (``video_id start end##sentence``,
  seconds) over precomputed frame features (``<features>/<video_id>.npy``, shape (steps, d))
  and the videos' durations (a CSV with ``id`` and ``length`` in seconds, as Charades ships).
  Lines that cannot be used are returned with a reason, never dropped silently.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mm_encoder.gmu import GroundingError, GroundingSet


@dataclass
class CharadesQuery:
    video: str
    start: float
    end: float
    sentence: str
    line: int


@dataclass
class CharadesFile:
    queries: list[CharadesQuery]
    #: (line number, the line, why it was not used).
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    lines: int = 0


def parse_charades_sta(path: str | Path) -> CharadesFile:
    """The annotation lines of ``path``; blank lines are skipped, a malformed line is rejected
    with its reason (lines = queries + rejected)."""
    out = CharadesFile([])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GroundingError(f"cannot read the Charades-STA file {path}: {e}") from None
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        out.lines += 1
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3 or not sentence.strip():
            out.rejected.append((no, line, "not 'video_id start end##sentence'"))
            continue
        try:
            start, end = float(parts[1]), float(parts[2])
        except ValueError:
            out.rejected.append((no, line, "start or end is not a number"))
            continue
        if not (0 <= start < end):
            out.rejected.append((no, line, f"needs 0 <= start < end, got {start} {end}"))
            continue
        out.queries.append(CharadesQuery(parts[0], start, end, sentence.strip(), no))
    return out


def read_durations(path: str | Path) -> dict[str, float]:
    """``id`` → ``length`` (seconds) from a Charades-style CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise GroundingError(f"cannot read the durations file {path}: {e}") from None
    if rows and not {"id", "length"} <= set(rows[0]):
        raise GroundingError(f"{path} needs columns id and length (seconds)")
    return {r["id"]: float(r["length"]) for r in rows}


def resample_steps(feats: np.ndarray, steps: int) -> np.ndarray:
    """(n, d) features → (min(n, steps), d): longer sequences are averaged over ``steps`` equal
    windows (the usual fixed-length feature sampling for grounding)."""
    n = len(feats)
    if n <= steps:
        return feats.astype(np.float32)
    edges = np.linspace(0, n, steps + 1).round().astype(int)
    return np.stack([feats[a:max(b, a + 1)].mean(0) for a, b in zip(edges[:-1], edges[1:])]
                    ).astype(np.float32)


def pad_videos(per_video: list[np.ndarray], steps: int):
    import torch

    d = per_video[0].shape[1]
    frames = torch.zeros(len(per_video), steps, d)
    mask = torch.zeros(len(per_video), steps, dtype=torch.bool)
    for i, f in enumerate(per_video):
        frames[i, :len(f)] = torch.from_numpy(f)
        mask[i, :len(f)] = True
    return frames, mask


def read_charades_sta(annotations, features, durations, text_tower, max_frames: int,
                      max_tokens: int) -> tuple[GroundingSet, CharadesFile]:
    """The grounding set of a Charades-STA file; queries whose video has no feature file or no
    duration, or whose span ends after the video, join ``rejected``."""
    from mm_encoder.camoe import token_states

    parsed = parse_charades_sta(annotations)
    lengths = read_durations(durations)
    vids: dict[str, int] = {}
    per_video, keep = [], []
    for q in parsed.queries:
        why = None
        if q.video not in lengths:
            why = "no duration for the video"
        elif q.end > lengths[q.video] + 1e-6:
            why = f"ends at {q.end} s, after the video's {lengths[q.video]} s"
        elif q.video not in vids:
            path = Path(features) / f"{q.video}.npy"
            if not path.exists():
                why = f"no feature file {path.name}"
            else:
                f = np.load(path, allow_pickle=False)
                if f.ndim != 2 or not len(f):
                    why = f"{path.name} is not a (steps, d) array"
                else:
                    vids[q.video] = len(per_video)
                    per_video.append(resample_steps(f, max_frames))
        if why:
            parsed.rejected.append((q.line, f"{q.video} {q.start} {q.end}##{q.sentence}", why))
        else:
            keep.append(q)
    if not keep:
        raise GroundingError(f"no usable query in {annotations} ({len(parsed.rejected)} "
                             "rejected, e.g. " + "; ".join(r[2] for r in parsed.rejected[:3])
                             + ")")
    parsed.queries = keep
    frames, mask = pad_videos(per_video, max_frames)
    tokens, tmask = token_states(text_tower, [q.sentence for q in keep], max_tokens)
    spans = np.asarray([[q.start / lengths[q.video], q.end / lengths[q.video]] for q in keep])
    return GroundingSet(frames, mask, tokens, tmask, spans,
                        np.asarray([vids[q.video] for q in keep], np.int64),
                        [q.sentence for q in keep]), parsed


def resize_frames(video: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if video.shape[1] == size:
        return video
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
                     for f in video])


def synthetic_set(n_videos: int, frames: int, size: int, seed: int, image_tower, text_tower,
                  max_tokens: int, max_frames: int | None = None) -> GroundingSet:
    """Queries (one per event) over ``n_videos`` synthetic untrimmed videos of ``frames`` steps
    (read as ``max_frames`` steps, evenly spaced, when fewer)."""
    from mm_encoder.camoe import frame_features, token_states
    from pipelines.synthetic_events import grounding_videos

    videos, events = grounding_videos(seed, n_videos, frames, size)
    image_size = getattr(image_tower, "image_size", size)
    fr, fm = frame_features(image_tower, [resize_frames(v, image_size) for v in videos],
                            max_frames or frames)
    captions, spans, video = [], [], []
    for i, evs in enumerate(events):
        for ev in evs:
            captions.append(ev.caption)
            spans.append([ev.start / frames, (ev.end + 1) / frames])
            video.append(i)
    tk, tm = token_states(text_tower, captions, max_tokens)
    return GroundingSet(fr, fm, tk, tm, np.asarray(spans), np.asarray(video, np.int64), captions)
