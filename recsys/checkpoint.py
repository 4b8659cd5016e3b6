"""Sharded training state on disk with ``torch.distributed.checkpoint`` (DCP).

Every rank writes only the shards it holds and reads only the pieces its own shards need: DCP
records each ``ShardedTensor`` shard with its offsets, and a load fills the local shards of the
model it is given, whatever that model's sharding is. A checkpoint written by N ranks therefore
loads into M ranks (resume after changing ``train.ranks``) and into an unsharded CPU model
(registration, scoring, with no process group). Replicated tensors (dense parameters, the
frozen content table, Adam's state) are written once. The only pickled file is DCP's own
``.metadata``; nothing here calls ``pickle`` or ``torch.load``.

Folders under an arm's output folder::

    checkpoints/step_<N>/   model, optimizer state and step (every ``checkpoint_every`` steps)
    checkpoints/best_<N>/   the weights of the best validation so far (saved when it improves)
    checkpoints/average_<N>/  the weight average at step N (``train.average``; recsys/averaging.py)
    model/                  the final weights

Each folder is complete once ``meta.json`` exists: it is written (to a temporary name, then
renamed) by rank 0 after DCP has written every rank's data and its ``.metadata`` and after a
barrier, so a run killed while saving resumes from the previous complete checkpoint. ``meta.json``
holds the step, the world size that wrote it, the early-stopping state and the ``best_<N>``
and ``average_<N>`` folders it goes with. Each rank's RNG state (dropout masks) is kept as ``rng_rank<r>.npy``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

META = "meta.json"


def save_state(model: torch.nn.Module, path: Path) -> str:
    """``model``'s state dict at ``path``, written atomically (a warm start's ``init_from``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return str(path)


def sharded_type():
    # TorchRec's sharded tables are ShardedTensors; torchrec re-exports the class.
    from torchrec.distributed.types import ShardedTensor

    return ShardedTensor


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state dict as ``path → value`` (paths joined with ``/``)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    out[prefix.rstrip("/")] = d
    return out


def local_pieces(state: dict) -> dict[str, Any]:
    """Detached copies of the rank-local content of a (nested) state dict: the local shards of
    every sharded tensor, the whole of every plain tensor (kept in memory, e.g. the best
    validation's weights)."""
    sharded = sharded_type()
    out: dict[str, Any] = {}
    for path, v in flatten(state).items():
        if isinstance(v, sharded):
            out[path] = [s.tensor.detach().clone() for s in v.local_shards()]
        elif isinstance(v, torch.Tensor):
            out[path] = v.detach().clone()
    return out


def restore_local(state: dict, pieces: dict[str, Any]) -> None:
    """Copy :func:`local_pieces` of the same model back in place."""
    sharded = sharded_type()
    with torch.no_grad():
        for path, v in flatten(state).items():
            if isinstance(v, sharded):
                for s, piece in zip(v.local_shards(), pieces[path]):
                    s.tensor.copy_(piece)
            elif isinstance(v, torch.Tensor):
                v.copy_(pieces[path])


def copy_full(dst: Any, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into ``dst``: the rank's shards of a sharded tensor (each
    at its offsets), or the whole of a plain tensor. Used for the seeded initial state, which
    every rank computes whole."""
    if isinstance(dst, sharded_type()):
        for s in dst.local_shards():
            idx = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets,
                                                         s.tensor.shape))
            s.tensor.copy_(full[idx])
    elif isinstance(dst, torch.Tensor):
        if tuple(dst.shape) != tuple(full.shape):
            raise CheckpointError(f"initial tensor of shape {tuple(full.shape)} does not fit "
                                  f"{tuple(dst.shape)}")
        dst.copy_(full)


def save(folder: Path, state: dict, rank: int, meta: Optional[dict] = None,
         rng: Optional[torch.Tensor] = None) -> None:
    """Collective: every rank calls it with its (sharded) ``state``; rank 0 marks the folder
    complete with ``meta`` once every rank's data and DCP's metadata are written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    if rng is not None:
        np.save(folder / f"rng_rank{rank}.npy", rng.numpy(), allow_pickle=False)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = folder / f".{META}.tmp"
        tmp.write_text(json.dumps(meta or {}, indent=1))
        os.replace(tmp, folder / META)


def load(folder: Path, state: dict) -> dict:
    """Fill ``state`` (sharded on any number of ranks, or a plain unsharded state dict outside a
    process group) in place from a complete folder; returns its ``meta.json``. Raises
    :class:`CheckpointError` on an incomplete folder or when the model does not match."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    meta = read_meta(folder)
    try:
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    except (CheckpointException, ValueError, RuntimeError, KeyError) as e:
        # CheckpointException (a BaseException) carries each rank's traceback: keep the cause.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = lines[-1] if lines else repr(e)
        raise CheckpointError(f"cannot load {folder} into this model ({cause}); was it written "
                              "with a different model or feature config?") from None
    return meta


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META
    if not path.exists():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {META})")
    return json.loads(path.read_text())


def load_rng(folder: Path, rank: int) -> Optional[torch.Tensor]:
    """The RNG state rank ``rank`` saved in ``folder``, or None (e.g. more ranks now)."""
    path = Path(folder) / f"rng_rank{rank}.npy"
    if not path.exists():
        return None
    return torch.from_numpy(np.load(path, allow_pickle=False))


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or does not fit the model."""


def latest(ckpt_root: Path, kind: str = "step") -> Path | None:
    """The newest complete ``<kind>_<N>`` folder, or None."""
    best, best_step = None, -1
    if not ckpt_root.exists():
        return None
    for d in ckpt_root.iterdir():
        m = re.fullmatch(rf"{kind}_(\d+)", d.name)
        if m and (d / META).exists() and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    return best
