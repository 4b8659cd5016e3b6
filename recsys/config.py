"""Ranker configuration (plain dataclasses: importing them does not import torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

#: The ablation arms one model definition serves (see ``recsys/features.py``).
Arm = Literal["id_only", "frozen_mm", "frozen_aligned", "codes", "codes_raw", "codes+frozen"]
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
    #: Standard deviation of every embedding table's initial values (one scale for all).
    init_scale: float = 0.1
    #: Add an explicit user x item dot product to the logit.
    dot: bool = True
    #: With ``dot``: the first value of the user's vector and of the target's summed parts are
    #: the user's and the item's biases (MF's b_u + b_i), the rest their dot product. On by
    #: default: MovieLens through the generic source gained by it (3 seeds: ``id_only`` +0.011
    #: [+0.002, +0.019] test AUC, ``codes`` +0.012 [-0.005, +0.029]), and so did the demo world.
    #: Job files and saved models from before it read as False (``recsys.job.model_config``).
    bias: bool = True
    #: The history features (target attention, matched pools) read the history items' table
    #: rows without sending gradient into them: an item's rows learn from its own events as a
    #: target only. Frozen content projections still learn from both. With ``bias``, this
    #: lifted every code arm of the demo world by 0.015-0.030 AUC (configs/demo.yaml turns it
    #: on) and lowered MovieLens through the generic source (3 seeds, against ``bias`` alone:
    #: ``codes`` -0.015 [-0.027, +0.002], ``id_only`` -0.024 [-0.046, +0.003], every arm's cold
    #: slice by 0.06-0.11), hence off by default.
    detach_history: bool = False
    #: L2 penalty on the looked-up rows of the user and target tables (per example).
    l2: float = 0.03
    #: Dropout on the dense input of the cross layers (training only).
    dropout: float = 0.3
    #: Read the target's predicted tags (the ``pretrain`` stage's tagger; the examples'
    #: ``pred_tags`` column) as one more bag feature, in every arm.
    pred_tags: bool = False


@dataclass
class MFConfig:
    """The logistic matrix factorisation baseline (plain PyTorch, ``recsys/baselines.py``)."""
    dim: int = 32
    lr: float = 3e-3
    #: L2 on the looked-up user and item rows (per example).
    l2: float = 1e-2
    init_scale: float = 0.01
    batch_size: int = 1024
    max_epochs: int = 100
    patience: int = 3


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    #: Ablation arms to train (see recsys.features).
    arms: list[Arm] = field(default_factory=lambda: list(ARMS))
    #: Baselines scored beside the arms: ``popularity`` and ``mf`` (see recsys.baselines).
    baselines: list[Literal["popularity", "mf"]] = field(
        default_factory=lambda: ["popularity", "mf"])
    mf: MFConfig = field(default_factory=MFConfig)
    #: Ranks (processes); each takes micro_batch rows per step.
    ranks: int = 2
    #: ``local`` spawns the ranks as subprocesses; ``torchrun`` runs them under torchrun.
    launcher: Literal["local", "torchrun"] = "local"
    #: ``cpu`` (gloo, fbgemm CPU kernels) or ``cuda`` (nccl, one GPU per rank).
    device: Literal["cpu", "cuda"] = "cpu"
    #: Global batch (split evenly across ranks).
    batch_size: int = 512
    #: The most epochs; early stopping on the validation part usually ends training sooner.
    epochs: int = 40
    #: Validate every N global steps (0 = once per epoch); stop after ``patience`` validations
    #: without improvement of ``valid_metric`` and keep the best weights (0 = no early stop).
    valid_every: int = 0
    patience: int = 4
    valid_metric: Literal["auc", "logloss"] = "auc"
    #: Polyak averaging (``recsys/averaging.py``): validation, early stopping and the saved
    #: model use an exponential moving average of the weights, with this decay per step (a
    #: horizon of ``1 / (1 - average)`` steps, at most one validation interval; normalised, so
    #: the initial weights never weigh in; 0 = the last weights). It costs one more copy of
    #: the weights. It smooths the walk of row-wise Adagrad at the grid's learning rates: on
    #: the demo world it lifted the code arm by 0.004 test AUC over 3 seeds (README).
    average: float = 0.99
    #: Stop after this many global steps (0 = all epochs).
    max_steps: int = 0
    #: Row-wise Adagrad learning rate of the embedding tables (fused into the backward).
    sparse_lr: float = 0.3
    #: Fused optimizer of the embedding tables (updates only the rows a batch looked up):
    #: row-wise Adagrad (one state value per row) or Adagrad (one per value). fbgemm's CPU
    #: kernels have no fused Adam.
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad"] = "rowwise_adagrad"
    #: Adam learning rate of the dense layers, and their decoupled weight decay (AdamW).
    dense_lr: float = 2e-3
    dense_weight_decay: float = 0.0
    seed: int = 0
    #: Save a checkpoint every N global steps (0 = never); resume from the newest.
    checkpoint_every: int = 0
    #: torch threads per rank (ranks x threads should not exceed the cores).
    threads_per_rank: int = 1
    #: Arms (and ``qarm ablation``'s runs) trained at once, each on its own ``ranks``
    #: processes: 0 = as many as the cores hold (cores // (ranks x threads_per_rank), one at a
    #: time on cuda or under torchrun). On 2 cores the demo's six arms, two at once on 1 rank
    #: each, train 2.1x faster than one at a time on 2 ranks: at this size the ranks'
    #: collectives cost more than they share. The results do not depend on it.
    parallel_arms: int = 0
    #: Register each trained arm in the MLflow model registry.
    register: bool = True
    #: Seconds a rank waits for the others in a collective before failing.
    timeout_s: int = 600
    #: Per-arm settings that override the ones above (what ``qarm ablation``'s grid chose),
    #: e.g. ``{codes: {sparse_lr: 0.1, dense_lr: 0.001}}``; keys: TUNABLE.
    tuned: dict[str, dict[str, float]] = field(default_factory=dict)

    def for_arm(self, arm: str) -> "TrainConfig":
        """This config with ``arm``'s tuned settings applied."""
        return self.with_settings(self.tuned.get(arm, {}), f"train.tuned.{arm}")

    def with_settings(self, over: dict[str, float], where: str = "settings") -> "TrainConfig":
        """This config with TUNABLE settings ``over`` applied (``where`` names them in errors)."""
        import dataclasses

        bad = set(over) - set(TUNABLE)
        if bad:
            raise ValueError(f"{where}: unknown settings {sorted(bad)}; "
                             f"tunable: {', '.join(TUNABLE)}")
        model = {k: v for k, v in over.items() if k in MODEL_TUNABLE}
        top = {k: v for k, v in over.items() if k not in MODEL_TUNABLE}
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **model), **top)

    def settings(self, arm: str) -> dict[str, float]:
        """The TUNABLE settings ``arm`` trains with (its tuned overrides applied)."""
        c = self.for_arm(arm)
        return {k: getattr(c.model, k) if k in MODEL_TUNABLE else getattr(c, k)
                for k in TUNABLE}


#: Settings a grid may tune (TrainConfig's, then ModelConfig's).
MODEL_TUNABLE = ("l2", "dropout")
TUNABLE = ("sparse_lr", "dense_lr") + MODEL_TUNABLE


@dataclass
class AblationConfig:
    """``qarm ablation``: one grid on seed 0 (chosen by the validation metric), then every arm
    with ``seeds`` seeds at its chosen settings; and the evaluation's statistics."""
    #: Seeds per arm (seed 0 is the grid's run at the chosen settings).
    seeds: int = 3
    #: Values to try, identical for every arm: TUNABLE keys -> lists. Every combination runs.
    grid: dict[str, list[float]] = field(default_factory=lambda: {
        "sparse_lr": [0.1, 0.3], "l2": [0.01, 0.03]})
    #: Bootstrap resamples of users for the intervals (0 = no intervals), and their level.
    bootstrap: int = 1000
    level: float = 0.95


#: How the retriever's item tower represents an item (``recsys/retrieval.py``).
ItemRepr = Literal["ids", "codes", "ids+codes", "frozen_aligned"]
ITEM_REPRS: tuple[str, ...] = get_args(ItemRepr)


@dataclass
class RetrievalConfig:
    """The sequential retriever (``recsys/retrieval.py``) and the ``retrieve`` stage."""
    #: Item representations to train a tower for (one retriever each); the first one that is
    #: trained writes the ``candidates`` table unless ``serve`` names another.
    towers: list[ItemRepr] = field(default_factory=lambda: ["ids", "codes", "ids+codes"])
    #: The tower whose candidates are written ("" = the best on validation NDCG@10).
    serve: str = ""
    #: Width of item and user vectors; history positions the user tower reads (the last N).
    dim: int = 32
    max_len: int = 50
    #: Causal transformer blocks and heads (SASRec: 2 blocks, 1-2 heads), dropout (SASRec used
    #: 0.2 on dense MovieLens-1M and 0.5 on sparse data; 0.5 measured best on the demo world).
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    #: Softmax temperature over cosine similarities.
    temperature: float = 0.1
    #: Uniform sampled negatives per micro-batch, on top of the in-batch ones.
    sampled_negatives: int = 256
    #: Sequences per global batch (split across ranks; capped at the number of training
    #: sequences, so small data still trains). Training runs at most ``epochs``
    #: epochs and ``max_steps`` steps (0 = no step limit), validates (full-ranking NDCG@10 on
    #: the validation part) every ``valid_every`` steps (0 = once per epoch), and stops after
    #: ``patience`` validations without improvement, keeping the best weights.
    batch_size: int = 128
    epochs: int = 200
    max_steps: int = 3000
    valid_every: int = 50
    patience: int = 5
    #: Row-wise Adagrad on the tables, AdamW on the towers.
    sparse_lr: float = 0.2
    dense_lr: float = 1e-3
    init_scale: float = 0.1
    ranks: int = 2
    launcher: Literal["local", "torchrun"] = "local"
    device: Literal["cpu", "cuda"] = "cpu"
    threads_per_rank: int = 1
    #: Towers (x seeds) trained at once, each on its own ``ranks`` processes: 0 = as many as
    #: the cores hold (as ``train.parallel_arms``).
    parallel_towers: int = 0
    timeout_s: int = 600
    #: Seeds per tower: metrics are averaged over seeds per user before the bootstrap.
    seeds: list[int] = field(default_factory=lambda: [0])
    #: faiss index factory string over the item vectors (inner product): ``Flat``,
    #: ``IVF64,Flat``, ``HNSW32``...; candidates per user written to the table.
    index: str = "Flat"
    top_k: int = 100
    #: Baseline retrievers evaluated beside the towers (``recsys/retrievers.py``).
    baselines: list[Literal["random", "popularity", "item2item", "content", "code_prefix"]] = \
        field(default_factory=lambda: ["random", "popularity", "item2item", "content",
                                       "code_prefix"])
    #: Recent positives a baseline retriever starts from.
    recent: int = 5
    #: The two-stage system: the ranker re-ranks this many of the best retriever's candidates.
    rerank: int = 100
    bootstrap: int = 1000
    level: float = 0.95
    register: bool = True


@dataclass
class ServeConfig:
    """``qarm serve``: the HTTP service over the champion models and the online store."""
    host: str = "127.0.0.1"
    port: int = 8000
    #: The most candidates one ``/score`` request may carry (more: HTTP 413).
    max_candidates: int = 1000
    #: The largest ``k`` of ``/recommend``.
    max_k: int = 500
    #: Load the champion's aligned encoder and codebook to code unknown items from the content
    #: a request carries (a few seconds at start and the towers' memory).
    code_unknown_items: bool = True
    #: Torch threads per process (requests run on a thread pool).
    threads: int = 1
