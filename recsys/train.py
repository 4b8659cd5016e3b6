"""Distributed ranker training with TorchRec, one process per rank.

Each rank:

1. joins the process group (``gloo`` on CPU by default; ``nccl`` with ``device: cuda``) from the
   standard ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
2. builds the ranker with its tables on ``meta``, registers fused row-wise Adagrad for every
   table (``apply_optimizer_in_backward``), asks the planner for a sharding plan (table-wise or
   row-wise per table, with the real ids per example as pooling factors so the ranks get
   balanced work) and wraps the model in ``DistributedModelParallel``;
3. copies a seeded initial state into its shards (every world size starts from the same
   weights), or loads the newest complete checkpoint when resuming (``recsys.checkpoint``:
   torch.distributed.checkpoint, so a checkpoint of N ranks resumes on M ranks);
4. trains with ``TrainPipelineSparseDist`` (input distribution of batch i+1 overlaps batch i),
   Adam on the dense parameters through a ``CombinedOptimizer``, streaming its share of the
   Parquet examples; saves a checkpoint (shards, optimizer state, step) every N steps;
5. scores its share of the evaluation examples under ``torch.no_grad()`` and writes them with
   its final shards to the output folder.

Run by ``qarm train`` (which spawns the ranks, or calls ``torchrun``) or directly::

    torchrun --nproc-per-node 2 -m recsys.train --job <out>/job.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from recsys.early_stopping import EarlyStopping, validate
from recsys.job import TrainError, TrainJob, model_config, spec_from_dict

log = logging.getLogger(__name__)


def _planner_constraints(spec, device_type: str = "cpu", world: int = 2):
    from torchrec.distributed.planner import ParameterConstraints

    # The planner picks table-wise (whole tables per rank) or row-wise (each rank holds a block
    # of every table's rows, so the lookups and the fused backward of a large, hot table are
    # split across ranks; hashed ids are spread over the rows, see recsys.data.table_rows).
    # Pooled (bag) tables are table-wise on CPU: TorchRec's sharder offers them row-wise only on
    # GPUs, and a sharder that offers it on CPU (gloo does reduce-scatter) balanced the ranks
    # but ran 4-9% slower at global batch 2,048: the reduce-scatter costs what the balance
    # saves. Column-wise was measured slower here. The pooling factors are the real ids per
    # example, without which the planner balances the ranks badly. On one rank row-wise only
    # adds the bucketizing of every id: table-wise.
    def kinds(t):
        if world > 1 and (t.kind == "sequence" or device_type == "cuda"):
            return ["table_wise", "row_wise"]
        return ["table_wise"]

    return {t.name: ParameterConstraints(sharding_types=kinds(t),
                                         pooling_factors=list(t.ids_per_example))
            for t in spec.tables}


def build_dmp(job: TrainJob, device, pg):
    """The sharded model and its combined optimizer (fused sparse + dense Adam)."""
    import torch

    from recsys.model import build_ranker
    from recsys.sharding import shard

    spec, cfg = spec_from_dict(job.spec), model_config(job.model)
    model = build_ranker(spec, cfg, "meta", ec_device="cpu" if device.type == "cpu" else "meta")
    world = torch.distributed.get_world_size(pg)
    dmp, opt, dense, plan = shard(model, model.sparse.parameters(),
                                  _planner_constraints(spec, device.type, world), device, pg,
                                  job.micro_batch, job.sparse_optimizer, job.sparse_lr,
                                  job.dense_lr, job.dense_weight_decay)
    return dmp, opt, dense, plan, spec


def initial_state(job: TrainJob) -> dict:
    """The seeded initial weights (identical for every world size and rank)."""
    import torch

    from recsys.model import build_ranker

    torch.manual_seed(job.seed)
    state = build_ranker(spec_from_dict(job.spec), model_config(job.model), "cpu",
                         frozen_table=load_frozen_table(job)).state_dict()
    if job.init_from:
        spec = spec_from_dict(job.spec)
        hashed = {t for f in spec.sparse if f.hashed for t in [f.table]}
        warm_start(state, torch.load(job.init_from, map_location="cpu", weights_only=True),
                   hashed)
    return state


def load_initial_state(dmp, job: TrainJob) -> None:
    """Copy the seeded initial weights (``initial_state``) into this rank's shards of ``dmp``."""
    import torch

    from recsys import checkpoint as ck

    init = initial_state(job)
    with torch.no_grad():
        for path, v in ck.flatten(dmp.state_dict()).items():
            ck.copy_full(v, init[path])


def warm_start(state: dict, previous: dict, hashed: set[str] = frozenset()) -> None:
    """Copy a previous model's weights into ``state`` in place: equal shapes whole; a table
    that has grown (more rows, as items and users arrive) keeps every previous row and its own
    initialisation for the new ones. In the ``hashed`` tables an id's row depends on the
    table's size (``recsys.data.table_rows``), so each previous id's row moves to where that
    id lives now; other tables index rows by value. The frozen content table is today's,
    never copied. Any other mismatch is a :class:`~recsys.job.TrainError`."""
    import numpy as np
    import torch

    from recsys.data import table_rows

    missing = sorted(set(state) - set(previous))
    if missing:
        raise TrainError(f"cannot warm-start: the previous model has no {', '.join(missing[:5])}"
                         " (another arm or feature set); train from scratch")
    for key, cur in state.items():
        if key.endswith("frozen_table"):
            continue
        prev = previous[key]
        if prev.shape == cur.shape:
            cur.copy_(prev)
        elif prev.dim() == cur.dim() and prev.shape[1:] == cur.shape[1:] and \
                prev.shape[0] <= cur.shape[0]:
            n, table = prev.shape[0], key.split(".")[-2]
            if table in hashed:
                ids = np.arange(n)
                cur[torch.from_numpy(table_rows(ids, cur.shape[0], True))] = \
                    prev[torch.from_numpy(table_rows(ids, n, True))]
            else:
                cur[:n].copy_(prev)
        else:
            raise TrainError(f"cannot warm-start {key}: shape {tuple(prev.shape)} in the "
                             f"previous model, {tuple(cur.shape)} now; train from scratch")


def load_frozen_table(job: TrainJob):
    import numpy as np
    import torch

    if not job.frozen_table:
        return None
    return torch.from_numpy(np.load(job.frozen_table).astype(np.float32))


def _plan_summary(plan) -> dict:
    out = {}
    for module, params in plan.plan.items():
        for name, p in params.items():
            out[f"{module}.{name}"] = {"sharding": p.sharding_type, "kernel": p.compute_kernel,
                                       "ranks": p.ranks}
    return out


def run_rank(job: TrainJob) -> None:
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from feature_store.schemas import PREDICTION_KEYS
    from recsys import checkpoint as ck
    from recsys.averaging import WeightAverage
    from recsys.data import ShardPlan, count_rows, eval_batches, train_batches

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.set_num_threads(job.threads)
    if job.device == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world != job.world:
        raise ValueError(f"job.json was written for {job.world} ranks (micro-batch "
                         f"{job.micro_batch}), this run has {world}: write the job for this "
                         "number of ranks (qarm train --set train.ranks=...)")
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=job.timeout_s))
    pg = dist.GroupMember.WORLD
    out = Path(job.out_dir)
    ckpt_root = out / "checkpoints"

    dmp, opt, dense_opt, plan, spec = build_dmp(job, device, pg)
    rows = count_rows(job.train_files)
    sp = ShardPlan(rows, job.micro_batch, world)
    total = sp.steps_per_epoch * job.epochs
    if job.max_steps:
        total = min(total, job.max_steps)
    if total == 0:
        raise ValueError(f"{rows} training examples make no global batch of "
                         f"{sp.global_batch}: lower train.batch_size")
    dense_opt.init_state()            # so a checkpoint's Adam state has tensors to land in
    start = 0
    average = None
    every = job.valid_every or sp.steps_per_epoch
    # Validation runs whenever there are validation files (keeping the best weights); patience
    # 0 only turns off stopping.
    validating = bool(job.valid_files)
    stopper = EarlyStopping(job.valid_metric, job.patience)
    best = None
    best_folder = None
    resume = ck.latest(ckpt_root)
    if resume is not None:
        meta = ck.read_meta(resume)
        if meta.get("best"):
            best_folder = ckpt_root / meta["best"]
            ck.load(best_folder, {"model": dmp.state_dict()})
            best = ck.local_pieces(dmp.state_dict())
        if job.average:
            average = WeightAverage(dmp, job.average, every)
            if meta.get("average"):
                average.load(ckpt_root / meta["average"])
        ck.load(resume, {"model": dmp.state_dict(), "optim": opt.state_dict()["state"]})
        if average is not None and not meta.get("average"):
            average.reset()       # a checkpoint written without averaging: start from it
        rng = ck.load_rng(resume, rank) if meta["world"] == world else None
        if rng is not None:       # dropout masks: the same draws as an uninterrupted run
            torch.set_rng_state(rng)
        start = meta["step"]
        stopper = EarlyStopping(job.valid_metric, job.patience, meta.get("early_stopping"))
        if rank == 0:
            log.info("resumed from %s (step %d, written by %d ranks, now %d)", resume, start,
                     meta["world"], world)
    else:
        load_initial_state(dmp, job)
        # init_state stepped Adam once with zero gradients: reset its step counters.
        for st in dense_opt.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"].zero_()
        if job.average:
            average = WeightAverage(dmp, job.average, every)

    losses: list[float] = []
    if validating and job.init_from and start == 0 and resume is None:
        # A warm start's own weights are a candidate too: when training on the new data only
        # makes the validation metric worse, the previous model is kept.
        value = validate(dmp, job, spec, device, world, rank)
        stopper.update(0, value)
        best = ck.local_pieces(dmp.state_dict())
        if job.checkpoint_every:
            best_folder = ckpt_root / "best_0"
            ck.save(best_folder, {"model": dmp.state_dict()}, rank,
                    meta={"step": 0, "world": world, "arm": job.arm})
    def save_checkpoint(done: int) -> None:
        if average is not None:
            average.save(ckpt_root / f"average_{done}", rank,
                         meta={"step": done, "world": world, "arm": job.arm})
        ck.save(ckpt_root / f"step_{done}",
                {"model": dmp.state_dict(), "optim": opt.state_dict()["state"]}, rank,
                meta={"step": done, "world": world, "arm": job.arm,
                      "early_stopping": stopper.state(),
                      "best": best_folder.name if best_folder is not None else None,
                      "average": f"average_{done}" if average is not None else None},
                rng=torch.get_rng_state())

    bar = None
    if rank == 0:
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, none in a log file.
        bar = tqdm(total=total, initial=start, desc=f"train {job.arm} ({world} ranks)",
                   unit="step", file=sys.stderr, disable=None)
    die_after = int(os.environ.get("QARM_TEST_DIE_AFTER_STEPS", "0"))
    warmup = min(5, max(0, total - start - 1))   # tracing and first-batch costs excluded
    prof = None
    t0 = t_warm = time.perf_counter()
    cpu_warm = time.process_time()
    valid_s = 0.0
    dmp.train()
    step = start
    while step < total and not stopper.stop:
        # Train up to the next validation point; the pipeline is rebuilt after each validation
        # (its pipelined forwards must be detached before the model is called directly).
        end = min(total, (step // every + 1) * every)
        pipeline = TrainPipelineSparseDist(dmp, opt, device)
        it = iter(train_batches(job.train_files, spec, sp, rank, job.epochs, step, end,
                                seed=job.seed))
        for step in range(step, end):
            if step == start + warmup:
                t_warm, cpu_warm = time.perf_counter(), time.process_time()
                valid_s = 0.0
                if job.profile_steps and rank == 0:
                    prof = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU])
                    prof.__enter__()
            if prof is not None and step == start + warmup + job.profile_steps:
                prof.__exit__(None, None, None)
                (out / "profile.txt").write_text(prof.key_averages().table(
                    sort_by="self_cpu_time_total", row_limit=40) + "\n"
                    + prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
                prof = None
            loss, _, _ = pipeline.progress(it)
            losses.append(float(loss))
            done = step + 1
            if average is not None:
                average.update(done)
            if bar is not None:
                bar.update(1)
                if done % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            # A checkpoint at a validation point is saved after that validation (below), so
            # its early-stopping state includes it.
            if (job.checkpoint_every and done % job.checkpoint_every == 0 and done < total
                    and not (validating and done == end)):
                save_checkpoint(done)
            if die_after and done == die_after and rank == 0:
                os._exit(17)   # test hook: a crash (no cleanup, like SIGKILL) between checkpoints
        step = end
        pipeline.detach()
        if validating:
            tv = time.perf_counter()
            # Validation, and the best weights, are the average's (when averaging).
            live = average.swap_in() if average is not None else None
            value = validate(dmp, job, spec, device, world, rank)
            valid_s += time.perf_counter() - tv
            if stopper.update(step, value):
                best = ck.local_pieces(dmp.state_dict())
                if job.checkpoint_every:
                    # On disk too: a resumed run must end with the same best weights.
                    best_folder = ckpt_root / f"best_{step}"
                    ck.save(best_folder, {"model": dmp.state_dict()}, rank,
                            meta={"step": step, "world": world, "arm": job.arm})
            if live is not None:
                average.swap_out(live)
            if bar is not None:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}",
                                **{f"valid_{job.valid_metric}": f"{value:.4f}"})
            if (job.checkpoint_every and step % job.checkpoint_every == 0 and step < total
                    and not stopper.stop):
                save_checkpoint(step)
    t_end = time.perf_counter()
    train_s = t_end - t0
    steps_run = step - start
    # Busy share of the timed window: below 1 means the rank waited (collectives, I/O).
    busy = (time.process_time() - cpu_warm) / max(t_end - t_warm, 1e-9)
    if prof is not None:
        prof.__exit__(None, None, None)
    if bar is not None:
        bar.close()
    if best is not None and (stopper.best_step != step or average is not None):
        ck.restore_local(dmp.state_dict(), best)  # the weights of the best validation
    elif average is not None:
        average.swap_in()                         # no validation: the final average

    # Local loss per step -> the global (mean over ranks) curve.
    curves = [None] * world
    dist.all_gather_object(curves, losses)
    import resource

    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    busy_all = [None] * world
    dist.all_gather_object(busy_all, busy)

    dmp.eval()
    scored = []
    score_files = job.valid_files + job.eval_files
    n_eval = count_rows(score_files)
    ep = ShardPlan(n_eval, job.micro_batch, world)
    with torch.no_grad():
        for batch, rows_t in eval_batches(score_files, spec, ep, rank, PREDICTION_KEYS):
            _, (_, logits, _) = dmp(batch.to(device))
            n = rows_t.num_rows
            if n:
                scores = torch.sigmoid(logits[:n].float()).cpu().numpy()
                scored.append(rows_t.select(list(PREDICTION_KEYS))
                              .append_column("score", pa.array(scores, pa.float32())))
    if scored:
        pq.write_table(pa.concat_tables(scored), out / f"predictions_rank{rank}.parquet")
    ck.save(out / "model", {"model": dmp.state_dict()}, rank,
            meta={"step": step, "world": world, "arm": job.arm})
    if rank == 0:
        curve = np.mean(np.asarray(curves, dtype=np.float64), axis=0).tolist()
        (out / "result.json").write_text(json.dumps({
            "arm": job.arm, "world": world, "steps": step, "max_steps": total,
            "steps_per_epoch": sp.steps_per_epoch, "resumed_from": start,
            "loss_curve": curve, "train_seconds": train_s,
            "valid_metric": job.valid_metric if validating else None,
            "valid_curve": stopper.history, "best_step": stopper.best_step if best is not None
            else step, "best_valid": stopper.best, "stopped_early": stopper.stop,
            "examples_per_second": (steps_run - warmup) * sp.global_batch
            / max(t_end - t_warm - valid_s, 1e-9) if steps_run > warmup else float("nan"),
            "warmup_steps": warmup, "peak_rss_mb_per_rank": rss,
            "cpu_busy_per_rank": [round(b, 3) for b in busy_all],
            "global_batch": sp.global_batch, "train_rows": rows, "eval_rows": n_eval,
            "plan": _plan_summary(plan)}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from recsys.launch import rank_main

    rank_main(argv, "python -m recsys.train",
              "One rank of ranker training. Start it with torchrun (or let `qarm train` "
                "spawn the ranks); the job file is written by `qarm train` into the arm's "
                "output folder.",
              TrainJob.load, run_rank)


if __name__ == "__main__":
    main()
