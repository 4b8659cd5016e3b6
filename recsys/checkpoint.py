"""Sharded state on disk: each rank saves the pieces it holds, any reader reassembles them.

A state dict (model or optimizer, nested) is flattened to ``path → entry``; a ``ShardedTensor``
entry keeps its global size and the rank's local shards with their offsets, a plain tensor is
kept whole (dense parameters are replicated, rank 0's copy is used). Assembling all ranks' files
gives full tensors, which can be

* copied into the local shards of a freshly sharded model of *any* world size (resume, even after
  changing the number of ranks), or
* loaded into an unsharded model (registration, scoring).

A checkpoint folder ``step_<N>`` holds ``rank<r>.pt`` files (each written to a temporary name and
renamed) and ``meta.json``, written by rank 0 after a barrier: only folders with ``meta.json`` are
complete, so a run killed while saving resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    out[prefix.rstrip("/")] = d
    return out


def local_pieces(state: dict) -> dict[str, dict]:
    """The rank-local content of a (nested) state dict, detached copies."""
    out: dict[str, dict] = {}
    for path, v in _flatten(state).items():
        if isinstance(v, ShardedTensor):
            out[path] = {"kind": "sharded", "size": list(v.size()),
                         "pieces": [(list(s.metadata.shard_offsets),
                                     s.tensor.detach().cpu().clone())
                                    for s in v.local_shards()]}
        elif isinstance(v, torch.Tensor):
            out[path] = {"kind": "tensor", "value": v.detach().cpu().clone()}
        else:
            out[path] = {"kind": "obj", "value": v}
    return out


def assemble(rank_payloads: list[dict[str, dict]]) -> dict[str, Any]:
    """Full tensors from every rank's pieces."""
    full: dict[str, Any] = {}
    for payload in rank_payloads:
        for path, e in payload.items():
            if e["kind"] == "sharded":
                t = full.get(path)
                if t is None:
                    t = full[path] = torch.zeros(e["size"], dtype=e["pieces"][0][1].dtype
                                                 if e["pieces"] else torch.float32)
                for offsets, piece in e["pieces"]:
                    t[_slices(offsets, piece.shape)] = piece
            elif path not in full:
                full[path] = e["value"]
    return full


def _slices(offsets, shape) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, shape))


def fill(state: dict, full: dict[str, Any], strict: bool = True) -> list[str]:
    """Copy ``full`` tensors into the (sharded) tensors of ``state`` in place. Returns the paths
    of ``state`` that ``full`` lacked (an error when ``strict``)."""
    missing = []
    for path, v in _flatten(state).items():
        if path not in full:
            missing.append(path)
            continue
        src = full[path]
        with torch.no_grad():
            if isinstance(v, ShardedTensor):
                for s in v.local_shards():
                    s.tensor.copy_(src[_slices(s.metadata.shard_offsets, s.tensor.shape)])
            elif isinstance(v, torch.Tensor):
                if tuple(v.shape) != tuple(src.shape):
                    raise ValueError(f"checkpoint tensor {path} has shape {tuple(src.shape)}, "
                                     f"the model {tuple(v.shape)}: a different model config?")
                v.copy_(src)
    if missing and strict:
        raise KeyError(f"checkpoint lacks {len(missing)} entries, e.g. {missing[:3]}")
    return missing


def save_rank(folder: Path, rank: int, payload: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / f"rank{rank}.pt")


def mark_complete(folder: Path, meta: dict) -> None:
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


def load_folder(folder: Path) -> tuple[dict, dict[str, dict]]:
    """(meta, full state by section) of a complete checkpoint or model folder."""
    meta = json.loads((folder / "meta.json").read_text())
    payloads = [torch.load(folder / f"rank{r}.pt", weights_only=False)
                for r in range(meta["world"])]
    sections = {k for p in payloads for k in p}
    return meta, {s: assemble([p[s] for p in payloads if s in p]) for s in sections}


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete ``step_<N>`` folder, or None."""
    best, best_step = None, -1
    if not ckpt_root.exists():
        return None
    for d in ckpt_root.iterdir():
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "meta.json").exists() and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    return best
