"""``qarm tag FOLDER``: tag a folder of images with the tagger the ``pretrain`` stage trained
(the newest ``qarm-tagger`` version in the registry, else the folder named by the newest
``item_pred_tags`` snapshot). Files that are not decodable images are listed with the reason,
never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class TagError(ValueError):
    """No tagger to use, or no folder of images."""


def tagger_folder(cfg) -> str:
    from feature_store.snapshots import SnapshotNotFound, SnapshotStore

    if cfg.mlflow.enabled:
        from jobs.registry import Registry

        reg = Registry(cfg)
        v = reg.alias("qarm-tagger", "champion") or reg.find("qarm-tagger")
        if v is not None:
            return str(reg.download(v))
    try:
        folder = SnapshotStore(cfg.store_uri).get("item_pred_tags").facts.folder
    except SnapshotNotFound:
        folder = ""
    if not folder:
        raise TagError("no tagger has been trained: run the pretrain stage "
                       "(qarm run --until pretrain)")
    return folder


def tag_folder(cfg, folder: str, top: int = 5, threshold: float = 0.5) -> list[dict]:
    import numpy as np

    from mm_encoder.tagger import load_tagger, predict, top_tags
    from mm_encoder.towers import decode_rgb, to_tensor

    root = Path(folder)
    if not root.is_dir():
        raise TagError(f"{folder} is not a folder")
    model, vocab, tcfg = load_tagger(Path(tagger_folder(cfg)))
    rows, images, ok = [], [], []
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            images.append(decode_rgb(path.read_bytes(), tcfg.image_size))
            ok.append(len(rows))
            rows.append({"file": path.name, "tags": []})
        except Exception as e:             # noqa: BLE001 - any undecodable file is a row
            rows.append({"file": path.name, "error": f"not a decodable image ({e})"})
    if not rows:
        raise TagError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if images:
        probs = predict(model, to_tensor(images))
        for i, best in zip(ok, top_tags(np.asarray(probs), vocab, top, threshold)):
            rows[i]["tags"] = [{"tag": t, "score": round(s, 4)} for t, s in best]
    return rows


def format_rows(rows: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps(rows, indent=1)
    width = max(len(r["file"]) for r in rows)
    return "\n".join(f"{r['file']:<{width}}  " + (r["error"] if "error" in r else ", ".join(
        f"{t['tag']} {t['score']:.2f}" for t in r["tags"])) for r in rows)
