"""``qarm ground VIDEO "query"``: the moments of a video that a query describes, with the GMU
model the ``ground`` stage trained (the one the newest ``item_highlights`` snapshot names, or
``--model FOLDER``).

VIDEO is a folder of frame images (read in name order: jpg, png, ...), or a ``.npy`` array of
per-step features of shape (steps, d) from the same image tower as the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def ground_video(cfg, video: str, query: str, top: int = 5,
                 model_folder: Optional[str] = None) -> list[dict]:
    import numpy as np
    import torch

    from feature_store.facts import GroundingFacts
    from feature_store.snapshots import SnapshotNotFound, SnapshotStore
    from jobs.stages.ground import towers_of
    from mm_encoder.camoe import frame_features, token_states
    from mm_encoder.gmu import GroundingError, GroundingSet, load_gmu, predict
    from mm_encoder.towers import decode_rgb

    if model_folder is None:
        try:
            model_folder = SnapshotStore(cfg.store_uri).get("item_highlights").facts_of(
                GroundingFacts).folder
        except SnapshotNotFound:
            raise GroundingError("no GMU model yet: run the ground stage (qarm run --set "
                                 "ground.enabled=true), or pass --model FOLDER") from None
    model, meta = load_gmu(model_folder)
    g = model.cfg
    path = Path(video)
    towers = towers_of(cfg)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise GroundingError(f"{path} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        size = getattr(towers.image, "image_size", 64)
        try:
            frames = np.stack([decode_rgb(p.read_bytes(), size) for p in files])
        except (OSError, ValueError) as e:
            raise GroundingError(f"a frame of {path} cannot be decoded: {e}") from None
        fr, fm = frame_features(towers.image, [frames], g.max_frames)
        steps = len(files)
    elif path.suffix == ".npy" and path.exists():
        from pipelines.grounding import pad_videos, resample_steps

        f = np.load(path, allow_pickle=False)
        if f.ndim != 2 or f.shape[1] != meta["frame_dim"]:
            raise GroundingError(f"{path} must be (steps, {meta['frame_dim']}) features, got "
                                 f"{f.shape}")
        fr, fm = pad_videos([resample_steps(f, g.max_frames)], g.max_frames)
        steps = len(f)
    else:
        raise GroundingError(f"{video} is neither a folder of frames nor a .npy feature file")
    tk, tm = token_states(towers.text, [query], g.max_tokens)
    data = GroundingSet(fr, fm, tk, tm, np.zeros((1, 2)), np.zeros(1, np.int64), [query])
    with torch.no_grad():
        spans, scores = predict(model, data, top=top, scores_too=True)
    return [{"rank": k + 1, "start": float(s), "end": float(e),
             "first_frame": int(np.floor(s * steps)),
             "last_frame": max(int(np.ceil(e * steps)) - 1, int(np.floor(s * steps))),
             "score": float(sc)} for k, ((s, e), sc) in enumerate(zip(spans[0], scores[0]))]


def format_moments(rows: list[dict], as_json: bool = False) -> str:
    import json

    if as_json:
        return json.dumps(rows, indent=1)
    from jobs.report import text_table

    return text_table([("rank", "d"), ("start", ".3f"), ("end", ".3f"), ("first_frame", "d"),
                       ("last_frame", "d"), ("score", ".3f")],
                      [(r["rank"], r["start"], r["end"], r["first_frame"], r["last_frame"],
                        r["score"]) for r in rows])
