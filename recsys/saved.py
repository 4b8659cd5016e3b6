"""A trained ranker as files that load without running code: ``weights.safetensors`` (tensors
only) and ``ranker.json`` (the feature spec and model config it was built with). Registration
stores this folder; loading builds the model from the config and copies the tensors in, so a
registered model can never execute code on the machine that loads it (a pickle put in place of
the weights is refused).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

FORMAT = "qarm-ranker/1"
WEIGHTS = "weights.safetensors"
CONFIG = "ranker.json"


class ModelFormatError(ValueError):
    """A model folder is not a qarm model (or its weights are not plain tensors)."""


def save_ranker(model, model_cfg, folder: Path, **extra) -> Path:
    """Write ``model`` (an unsharded ``recsys.model.Ranker``) built with ``model_cfg``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / CONFIG).write_text(json.dumps({
        "format": FORMAT, "spec": dataclasses.asdict(model.spec),
        "model": dataclasses.asdict(model_cfg), **extra}, indent=1))
    return folder


def read_config(folder: Path, name: str = CONFIG, fmt: str = FORMAT) -> dict:
    """The JSON config ``name`` of a model folder, checked to be of format ``fmt``."""
    path = Path(folder) / name
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is missing or not JSON ({e})") from None
    if cfg.get("format") != fmt:
        raise ModelFormatError(f"{path} is not a {fmt} model (format {cfg.get('format')!r})")
    return cfg


def load_ranker(folder: Path):
    """The ranker of ``folder`` on CPU, in eval mode. Raises :class:`ModelFormatError` for any
    weights file that is not safetensors (a pickle is never opened as one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from recsys.job import model_config, spec_from_dict
    from recsys.model import build_ranker

    cfg = read_config(folder)
    path = Path(folder) / WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is not a safetensors file ({e}); qarm loads weights "
                               "only as plain tensors, never by unpickling") from None
    model = build_ranker(spec_from_dict(cfg["spec"]), model_config(cfg["model"]), "cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFormatError(f"{path} does not fit its {CONFIG} (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    return model.eval()


RETRIEVER_FORMAT = "qarm-retriever/1"
RETRIEVER_CONFIG = "retriever.json"
FEATURES = "features.npz"


def save_retriever(model, job, feats, folder: Path, **extra) -> Path:
    """Write a trained ``recsys.retrieval.Retriever``: its tensors, the architecture it was
    built with (``job``'s fields) and the item features it reads (codes, VQ bags, popularity)
    as plain arrays."""
    import numpy as np
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": RETRIEVER_FORMAT})
    np.savez(folder / FEATURES, n_items=feats.n_items, rq=feats.rq,
             vq_offsets=feats.vq_offsets, vq_values=feats.vq_values,
             codes_per_level=feats.codes_per_level, popularity=feats.popularity)
    arch = {k: getattr(job, k) for k in ("arm", "dim", "max_len", "blocks", "heads", "dropout",
                                         "temperature")}
    (folder / RETRIEVER_CONFIG).write_text(json.dumps({
        "format": RETRIEVER_FORMAT, "item_repr": job.arm, "arch": arch,
        "frozen_dim": int(model.items.frozen_table.shape[1])
        if model.items.proj is not None else 0, **extra}, indent=1))
    return folder


def load_retriever(folder: Path):
    """``(retriever, item features)`` of ``folder``, on CPU in eval mode; never unpickles."""
    import numpy as np
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from recsys.retrieval import ItemFeatures, Retriever

    cfg = read_config(folder, RETRIEVER_CONFIG, RETRIEVER_FORMAT)
    try:
        state = load_file(str(Path(folder) / WEIGHTS))
        z = np.load(Path(folder) / FEATURES, allow_pickle=False)
        feats = ItemFeatures(int(z["n_items"]), z["rq"], z["vq_offsets"], z["vq_values"],
                             int(z["codes_per_level"]), z["popularity"])
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(f"{folder} does not hold plain tensors and arrays ({e}); qarm "
                               "never loads a model by unpickling") from None
    a = cfg["arch"]
    frozen = torch.zeros(feats.n_items, cfg["frozen_dim"]) if cfg["frozen_dim"] else None
    model = Retriever(cfg["item_repr"], feats, a["dim"], a["max_len"], a["blocks"], a["heads"],
                      a["dropout"], a["temperature"], frozen)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFormatError(f"{folder} weights do not fit {RETRIEVER_CONFIG} (missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), feats
