"""CUDA path check: the ranker trained on GPU (NCCL, fbgemm's CUDA kernels) and on CPU (gloo)
from the same seed and batches. Prints JSON.

    python bench/cuda_check.py                    # 1 GPU rank vs 1 CPU rank, codes arm
    python bench/cuda_check.py --gpus 2           # 2 GPU ranks (needs 2 GPUs) vs 1 CPU rank

Needs a CUDA build of torch with ``fbgemm-gpu`` (not ``fbgemm-gpu-cpu``) and torchrec; where no
GPU is visible it says so and exits 2. Both runs go through the same code a user's
``train.device: cuda`` takes (``recsys.train``: model on ``meta``, planner,
DistributedModelParallel, fused row-wise Adagrad, TrainPipelineSparseDist, sharded checkpoints,
scoring). Reported: the
largest difference between the two loss curves and between the evaluation scores (float32 on
different kernels: close, not bit-equal), examples/s of each, and the plan.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit, scratch_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--gpus", type=int, default=1, help="GPU ranks (one GPU each)")
    ap.add_argument("--tolerance", type=float, default=1e-2,
                    help="largest loss-curve difference that passes")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        print(f"cuda_check: needs {args.gpus} visible GPU(s); torch {torch.__version__} sees "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}",
              file=sys.stderr)
        raise SystemExit(2)

    from recsys.config import ModelConfig, TrainConfig
    from recsys.features import build_spec
    from recsys.runner import make_job
    from recsys.testing import random_examples, write_examples
    from recsys.launch import launch

    tmp = scratch_dir("qarm-cuda-check-")
    t = random_examples(args.examples, n_items=args.items, n_users=args.users, levels=3,
                        codes=256, vq_k=10, hist=20, seed=1, zipf=1.0)
    files = write_examples(tmp / "train", t, files=2)
    ev = write_examples(tmp / "eval", t.slice(0, 4 * args.batch), files=1)
    mean_hist = float(sum(len(h) for h in t.column("hist_item_ids").to_pylist()) / t.num_rows)
    spec = build_spec("codes", dim=16, history_len=20, levels=3, codes_per_level=256,
                      n_items=args.items, n_users=args.users, mean_history=mean_hist, vq_k=10)

    def run(device: str, ranks: int) -> tuple[dict, np.ndarray]:
        cfg = TrainConfig(model=ModelConfig(), ranks=ranks, device=device,
                          batch_size=args.batch, epochs=1, max_steps=args.steps,
                          threads_per_rank=4 if device == "cpu" else 1, register=False)
        out = tmp / f"{device}{ranks}"
        r = launch(make_job(spec, cfg, files, ev, out), ranks, quiet=True)
        preds = pq.read_table(sorted(out.glob("predictions_rank*.parquet"))).sort_by(
            [("user_id", "ascending"), ("item_id", "ascending"), ("ts", "ascending")])
        return r, preds.column("score").to_numpy()

    gpu, gpu_scores = run("cuda", args.gpus)
    cpu, cpu_scores = run("cpu", 1)
    loss_diff = float(np.max(np.abs(np.asarray(gpu["loss_curve"]) - cpu["loss_curve"])))
    emit({"benchmark": "cuda_check", "torch": torch.__version__,
          "gpu": torch.cuda.get_device_name(0), "gpu_ranks": args.gpus,
          "steps": gpu["steps"], "global_batch": gpu["global_batch"],
          "loss_curve_max_abs_diff": loss_diff,
          "eval_score_max_abs_diff": float(np.max(np.abs(gpu_scores - cpu_scores))),
          "final_loss": {"cuda": float(np.mean(gpu["loss_curve"][-10:])),
                         "cpu": float(np.mean(cpu["loss_curve"][-10:]))},
          "examples_per_second": {"cuda": gpu["examples_per_second"],
                                  "cpu": cpu["examples_per_second"]},
          "plan_cuda": gpu["plan"], "passed": loss_diff <= args.tolerance}, args.out)
    if loss_diff > args.tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
