"""Ranker configuration (plain dataclasses: importing them does not import torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

#: The ablation arms one model definition serves (see ``recsys/features.py``).
Arm = Literal["id_only", "frozen_mm", "codes", "codes_raw", "codes+frozen"]
ARMS: tuple[str, ...] = get_args(Arm)


@dataclass
class ModelConfig:
    #: Embedding dimension of every table (an EmbeddingCollection needs one shared dimension).
    dim: int = 16
    #: Rows of the item-id table (ids are taken modulo it); 0 = one row per item.
    item_hash_size: int = 0
    #: Rows of the user-id table; 0 = one row per user.
    user_hash_size: int = 0
    #: Target-attention projection width.
    attention_dim: int = 32
    #: DCN-v2 cross layers and the rank of their low-rank weight.
    cross_layers: int = 2
    cross_rank: int = 32
    mlp: list[int] = field(default_factory=lambda: [128, 64])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    #: Ablation arms to train (see recsys.features).
    arms: list[Arm] = field(default_factory=lambda: list(ARMS))
    #: Ranks (processes); each takes micro_batch rows per step.
    ranks: int = 2
    #: ``local`` spawns the ranks as subprocesses; ``torchrun`` runs them under torchrun.
    launcher: Literal["local", "torchrun"] = "local"
    #: ``cpu`` (gloo, fbgemm CPU kernels) or ``cuda`` (nccl, one GPU per rank).
    device: Literal["cpu", "cuda"] = "cpu"
    #: Global batch (split evenly across ranks).
    batch_size: int = 512
    epochs: int = 2
    #: Stop after this many global steps (0 = all epochs).
    max_steps: int = 0
    #: Row-wise Adagrad learning rate of the embedding tables (fused into the backward).
    sparse_lr: float = 0.05
    #: Adam learning rate of the dense layers.
    dense_lr: float = 2e-3
    seed: int = 0
    #: Save a checkpoint every N global steps (0 = never); resume from the newest.
    checkpoint_every: int = 0
    #: torch threads per rank (ranks x threads should not exceed the cores).
    threads_per_rank: int = 1
    #: Register each trained arm in the MLflow model registry.
    register: bool = True
    #: Seconds a rank waits for the others in a collective before failing.
    timeout_s: int = 600
