"""A trained model as a folder: ``weights.safetensors`` (plain tensors) plus a JSON file of its
config and facts, tagged with a format string. Loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_folder(folder: str | Path, state: dict[str, torch.Tensor], meta_name: str, fmt: str,
                meta: dict) -> Path:
    """Write ``state`` and ``{"format": fmt, **meta}`` (as ``meta_name``) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "weights.safetensors"), metadata={"format": fmt})
    (folder / meta_name).write_text(json.dumps({"format": fmt, **meta}, indent=1))
    return folder


def load_folder(folder: str | Path, meta_name: str, fmt: str, error: type[Exception],
                what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, state) of a folder :func:`save_folder` wrote; ``error`` names ``what`` it is not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / meta_name).read_text())
        state = load_file(str(folder / "weights.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise error(f"{folder} is not a saved {what} ({e}); weights load only as plain "
                    "tensors, never by unpickling") from None
    if meta.get("format") != fmt:
        raise error(f"{folder} is not a {fmt} {what}")
    return meta, state
