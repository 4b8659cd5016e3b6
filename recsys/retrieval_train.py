"""Distributed training of the sequential retriever, one process per rank, and the driver side
that writes the job, launches the ranks and loads the trained model.

Each rank joins the process group (gloo on CPU, nccl with ``device: cuda``), builds the retriever
with its tables on ``meta``, shards them with ``DistributedModelParallel`` (fused row-wise Adagrad
on the tables, AdamW on the dense towers, ``recsys.sharding``), copies the seeded initial weights
into its shards, and trains on its share of every global batch of training sequences. After each
``valid_every`` steps the ranks validate together: each computes the vectors of its share of the items through
the sharded tables, the shares are gathered, and each rank scores its share of the validation
queries by full ranking (NDCG@10, summed over ranks); the best weights are kept and training stops
after ``patience`` validations without improvement. The final (best) weights are saved with
``torch.distributed.checkpoint``; the driver loads them into one unsharded CPU model.

    torchrun --nproc-per-node 2 -m recsys.retrieval_train --job <out>/job.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class RetrievalJob:
    arm: str                 # the item representation (the tower's name)
    out_dir: str
    features: str            # .npz of the ItemFeatures
    frozen: str              # .npy of the aligned vectors by item id ("" if not used)
    sequences: str           # .npz: offsets, items (training sequences, oldest first)
    valid: str               # .npz of the validation Queries ("" = no early stopping)
    dim: int
    max_len: int
    blocks: int
    heads: int
    dropout: float
    temperature: float
    sampled: int
    micro_batch: int
    epochs: int
    patience: int
    #: Validate every N steps (0 = once per epoch); stop after N steps (0 = all epochs).
    valid_every: int
    max_steps: int
    sparse_lr: float
    dense_lr: float
    init_scale: float
    seed: int
    device: str = "cpu"
    threads: int = 1
    timeout_s: int = 600
    world: int = 1
    #: Warm start: a ``.pt`` state dict of a trained retriever of the same tower (the daily
    #: job's previous day); grown tables keep its rows (``recsys.train.warm_start``).
    init_from: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "RetrievalJob":
        return cls(**json.loads(Path(path).read_text()))


def save_features(feats, path: Path) -> str:
    np.savez(path, n_items=feats.n_items, rq=feats.rq, vq_offsets=feats.vq_offsets,
             vq_values=feats.vq_values, codes_per_level=feats.codes_per_level,
             popularity=feats.popularity)
    return str(path)


def load_features(path):
    from recsys.retrieval import ItemFeatures

    z = np.load(path)
    return ItemFeatures(int(z["n_items"]), z["rq"], z["vq_offsets"], z["vq_values"],
                        int(z["codes_per_level"]), z["popularity"])


def build_model(job: RetrievalJob, feats, device="cpu"):
    import torch

    from recsys.retrieval import Retriever

    frozen = torch.from_numpy(np.load(job.frozen)) if job.frozen else None
    return Retriever(job.arm, feats, job.dim, job.max_len, job.blocks, job.heads, job.dropout,
                     job.temperature, frozen, device)


def initial_state(job: RetrievalJob, feats) -> dict:
    import torch

    from recsys.retrieval import init_tables

    from recsys.train import warm_start

    torch.manual_seed(job.seed)
    model = build_model(job, feats)
    init_tables(model, job.init_scale)
    state = model.state_dict()
    if job.init_from:
        warm_start(state, torch.load(job.init_from, map_location="cpu", weights_only=True))
    return state


def _sharded_item_vectors(model, feats, world: int, rank: int, chunk: int = 2048):
    """Every item's unnormalised vector, each rank computing its share through the sharded
    tables (all ranks call the tables the same number of times), gathered."""
    import torch
    import torch.distributed as dist

    from recsys.retrieval import item_kjt

    n = feats.n_items
    per = math.ceil(n / world)
    mine = np.arange(rank * per, min(n, (rank + 1) * per))
    out = []
    for r in range(math.ceil(per / chunk)):
        part = mine[r * chunk:(r + 1) * chunk]
        ids = np.zeros(chunk, np.int64)
        ids[:len(part)] = part
        kjt = item_kjt(part, feats, model.names, chunk) if model.names else None
        out.append(model.items(kjt, torch.from_numpy(ids))[:len(part)])
    local = torch.cat(out) if out else torch.zeros(0, model.user.pos.weight.shape[1])
    padded = torch.zeros(per, local.shape[1])
    padded[:len(local)] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[:n]


def validate(model, feats, queries, world: int, rank: int) -> float:
    """NDCG@10 of the validation queries, full ranking (the same value on every rank)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from recsys.retrieval_metrics import Queries, rank_queries, recall_ndcg

    with torch.no_grad():
        raw = _sharded_item_vectors(model, feats, world, rank)
        items = F.normalize(raw, dim=1)
        idx = np.arange(rank, len(queries), world)
        sub = Queries.build(queries.users[idx], [queries.history(i) for i in idx],
                            [queries.targets(i) for i in idx])
        total = torch.zeros(2, dtype=torch.float64)
        if len(sub):
            users = model.user_vectors(raw, sub.histories())
            top = rank_queries(lambda j: users[j] @ items.T, sub, feats.n_items, 10)
            nd = recall_ndcg(top, [sub.targets(u) for u in range(len(sub))], (), (10,))
            total += torch.tensor([nd["ndcg@10"].sum(), len(sub)], dtype=torch.float64)
        dist.all_reduce(total)
    return float(total[0] / max(total[1], 1))


def run_rank(job: RetrievalJob) -> None:
    import datetime as dt

    import torch
    import torch.distributed as dist

    from recsys import checkpoint as ck
    from recsys.early_stopping import EarlyStopping
    from recsys.retrieval import lookup_rows, make_batch
    from recsys.retrieval_metrics import Queries
    from recsys.sharding import shard

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(job.threads)
    if job.device == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world != job.world:
        raise ValueError(f"job.json was written for {job.world} ranks, this run has {world}")
    dist.init_process_group("nccl" if job.device == "cuda" else "gloo",
                            timeout=dt.timedelta(seconds=job.timeout_s))
    pg = dist.GroupMember.WORLD
    out = Path(job.out_dir)
    feats = load_features(job.features)
    model = build_model(job, feats, "meta")
    sparse = list(model.items.ebc.parameters()) if model.items.ebc is not None else []
    from torchrec.distributed.planner import ParameterConstraints

    constraints = {t: ParameterConstraints(sharding_types=["table_wise"])
                   for t, _ in (model.items.ebc.named_parameters() if sparse else [])}
    constraints = {name.split(".")[1]: c for name, c in constraints.items()}
    dmp, opt, dense_opt, plan = shard(model, sparse, constraints, device, pg, job.micro_batch,
                                      "rowwise_adagrad", job.sparse_lr, job.dense_lr)
    with torch.no_grad():
        init = initial_state(job, feats)
        for path, v in ck.flatten(dmp.state_dict()).items():
            ck.copy_full(v, init[path])
    inner = dmp.module

    z = np.load(job.sequences)
    offsets, items = z["offsets"], z["items"]
    seqs = [items[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    G = job.micro_batch * world
    steps_per_epoch = len(seqs) // G
    if steps_per_epoch == 0:
        raise ValueError(f"{len(seqs)} training sequences make no global batch of {G}: lower "
                         "retrieval.batch_size")
    queries = Queries.load(job.valid) if job.valid else None
    stride = lookup_rows(job.micro_batch, job.max_len, job.sampled, feats.n_items)
    stopper = EarlyStopping("ndcg", job.patience)
    best = None
    losses: list[float] = []
    bar = None
    total = steps_per_epoch * job.epochs
    if job.max_steps:
        total = min(total, job.max_steps)
    if rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"retriever {job.arm} ({world} ranks)", unit="step",
                   file=sys.stderr, disable=None)
    t_train, positions = 0.0, 0
    every = job.valid_every or steps_per_epoch
    step, order = 0, None
    if queries is not None and job.init_from:
        # A warm start's own weights are a candidate: kept when training does not beat them.
        dmp.eval()
        stopper.update(0, validate(inner, feats, queries, world, rank))
        best = ck.local_pieces(dmp.state_dict())
    dmp.train()
    t0 = time.perf_counter()
    while step < total and not stopper.stop:
        epoch, s = divmod(step, steps_per_epoch)
        if s == 0 or order is None:
            order = np.random.default_rng([job.seed, epoch]).permutation(len(seqs))
        mine = order[s * G + rank * job.micro_batch: s * G + (rank + 1) * job.micro_batch]
        rng = np.random.default_rng([job.seed, epoch, s, rank])
        batch = make_batch([seqs[i] for i in mine], feats, inner.names, job.max_len,
                           job.sampled, stride, rng).to(device)
        loss, n = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        positions += int(n)
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if queries is None or (step % every and step < total):
            continue
        t_train += time.perf_counter() - t0
        dmp.eval()
        value = validate(inner, feats, queries, world, rank)
        if stopper.update(step, value):
            best = ck.local_pieces(dmp.state_dict())
        if bar is not None:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", valid_ndcg10=f"{value:.4f}")
        dmp.train()
        t0 = time.perf_counter()
    t_train += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if best is not None and stopper.best_step != step:
        ck.restore_local(dmp.state_dict(), best)
    curves = [None] * world
    dist.all_gather_object(curves, losses)
    pos_all = torch.tensor([positions], dtype=torch.float64)
    dist.all_reduce(pos_all)
    ck.save(out / "model", {"model": dmp.state_dict()}, rank,
            meta={"step": step, "world": world, "arm": job.arm})
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "arm": job.arm, "world": world, "steps": step,
            "steps_per_epoch": steps_per_epoch,
            "loss_curve": np.mean(np.asarray(curves, np.float64), axis=0).tolist(),
            "valid_curve": stopper.history, "best_step": stopper.best_step,
            "best_valid": stopper.best, "stopped_early": stopper.stop,
            "train_seconds": t_train, "global_batch": G,
            "sequences_per_second": step * G / max(t_train, 1e-9),
            "positions_per_second": float(pos_all[0]) / max(t_train, 1e-9)}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def train_retriever(job: RetrievalJob, ranks: int, launcher: str = "local",
                    quiet: bool = False):
    """Launch the ranks; returns (the trained unsharded CPU model, result.json)."""
    from recsys.launch import launch

    out = Path(job.out_dir)
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    result = launch(job, ranks, launcher, quiet=quiet, module="recsys.retrieval_train")
    return load_trained(out), result


def save_initial(out_dir, path: Path) -> str:
    """The trained retriever of ``out_dir`` as a state dict at ``path`` (a warm start's
    ``init_from``)."""
    from recsys.checkpoint import save_state

    return save_state(load_trained(out_dir), path)


def load_trained(out_dir):
    from recsys import checkpoint as ck

    job = RetrievalJob.load(Path(out_dir) / "job.json")
    model = build_model(job, load_features(job.features))
    ck.load(Path(out_dir) / "model", {"model": model.state_dict()})
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from recsys.launch import rank_main

    rank_main(argv, "python -m recsys.retrieval_train",
              "One rank of retriever training. Start it with torchrun (or let the "
                "retrieve stage spawn the ranks); the stage writes job.json.",
              RetrievalJob.load, run_rank)


if __name__ == "__main__":
    main()
