"""Train one ablation arm end to end from a driver process: write the job, launch the ranks,
collect their predictions, assemble the trained model. The DAG's ``train`` stage calls this."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import TrainConfig
from recsys.features import FeatureSpec, FeatureSpecError
from recsys.job import TrainJob
from recsys.launch import launch

log = logging.getLogger(__name__)


@dataclass
class ArmResult:
    arm: str
    result: dict          # result.json of rank 0 (loss curve, throughput, plan, ...)
    predictions: pa.Table
    out_dir: Path
    resumed: bool


def make_job(spec: FeatureSpec, cfg: TrainConfig, train_files: list[str],
             eval_files: list[str], out_dir: Path, frozen_table: str = "",
             valid_files: list[str] = (), init_from: str = "") -> TrainJob:
    """The job of one arm: trained on ``train_files``, early-stopped on ``valid_files`` (when
    given), then both ``valid_files`` and ``eval_files`` are scored."""
    if spec.frozen_rows and not frozen_table:
        raise FeatureSpecError(f"arm {spec.arm} needs the frozen content table "
                               "(item embeddings by item id)")
    if not (cfg.average == 0 or 0 < cfg.average < 1):
        raise ValueError(f"train.average must be 0 (off) or a decay in (0, 1), got "
                         f"{cfg.average}")
    if cfg.batch_size % cfg.ranks:
        raise ValueError(f"train.batch_size {cfg.batch_size} must divide evenly over "
                         f"train.ranks {cfg.ranks}")
    return TrainJob(arm=spec.arm, spec=dataclasses.asdict(spec),
                    model=dataclasses.asdict(cfg.model), train_files=sorted(train_files),
                    eval_files=sorted(eval_files), out_dir=str(out_dir),
                    micro_batch=cfg.batch_size // cfg.ranks, epochs=cfg.epochs,
                    max_steps=cfg.max_steps, sparse_lr=cfg.sparse_lr, dense_lr=cfg.dense_lr,
                    seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                    device=cfg.device, threads=cfg.threads_per_rank, timeout_s=cfg.timeout_s,
                    frozen_table=frozen_table if spec.frozen_rows else "",
                    valid_files=sorted(valid_files), valid_every=cfg.valid_every,
                    patience=cfg.patience, valid_metric=cfg.valid_metric,
                    sparse_optimizer=cfg.sparse_optimizer,
                    dense_weight_decay=cfg.dense_weight_decay, world=cfg.ranks,
                    init_from=init_from, average=cfg.average)


def prepare_out_dir(job: TrainJob) -> bool:
    """Keep the folder (and its checkpoints) only when it holds an unfinished run of this job
    (on any number of ranks): that run resumes. Otherwise start clean. Returns whether it will
    resume."""
    out = Path(job.out_dir)
    old = out / "job.json"
    if old.exists() and not (out / "model" / "meta.json").exists():
        if TrainJob.load(old).resume_key() == job.resume_key():
            return (out / "checkpoints").exists()
    if out.exists():
        shutil.rmtree(out)
    return False


def train_arm(spec: FeatureSpec, cfg: TrainConfig, train_files: list[str],
              eval_files: list[str], out_dir: Path, quiet: bool = False,
              frozen_table: str = "", valid_files: list[str] = (),
              init_from: str = "") -> ArmResult:
    job = make_job(spec, cfg, train_files, eval_files, out_dir, frozen_table, valid_files,
                   init_from)
    resumed = prepare_out_dir(job)
    if resumed:
        log.info("arm %s: resuming the unfinished run in %s", spec.arm, out_dir)
    result = launch(job, cfg.ranks, cfg.launcher, quiet=quiet)
    parts = sorted(Path(out_dir).glob("predictions_rank*.parquet"))
    preds = pa.concat_tables([pq.read_table(p) for p in parts])
    preds = preds.add_column(0, "arm", pa.array([spec.arm] * preds.num_rows, pa.string()))
    return ArmResult(spec.arm, result, preds, Path(out_dir), resumed)


def load_trained(out_dir: Path):
    """The trained ranker of ``out_dir`` as one unsharded CPU module (for registry/scoring)."""
    from recsys import checkpoint as ck
    from recsys.model import build_ranker
    from recsys.job import model_config, spec_from_dict

    job = TrainJob.load(Path(out_dir) / "job.json")
    spec = spec_from_dict(job.spec)
    model = build_ranker(spec, model_config(job.model), "cpu")
    # DCP assembles the shards of every rank into this unsharded model, in place.
    ck.load(Path(out_dir) / "model", {"model": model.state_dict()})
    return model.eval()


def save_initial(out_dir: Path, path: Path) -> str:
    """The trained ranker of ``out_dir`` as a state dict at ``path`` (a warm start's
    ``init_from``)."""
    from recsys.checkpoint import save_state

    return save_state(load_trained(out_dir), path)


def write_frozen_table(ids: np.ndarray, vectors: np.ndarray, n_items: int, path: Path) -> str:
    """The frozen content vectors as an (n_items, D) ``.npy`` indexed by item id (rows of items
    without a vector are zero): the table the frozen arms look history items up in."""
    table = np.zeros((n_items, vectors.shape[1]), np.float32)
    table[ids] = vectors
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, table)
    return str(path)
