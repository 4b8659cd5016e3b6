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


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is missing or not JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise ModelFormatError(f"{path} is not a {FORMAT} model (format {cfg.get('format')!r})")
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
