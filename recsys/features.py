"""The ranker's feature specification: one declaration, read by the batch builder, the model and
the scorer.

Sparse features are looked up in TorchRec tables. ``sequence`` features (one id per example, or a
history of ids) go to an ``EmbeddingCollection`` (unpooled: the model needs each history
position for target attention); ``bag`` features go to an ``EmbeddingBagCollection`` and are
pooled there. A candidate feature and its history feature share one table (``item`` holds
``item_id`` and ``hist_item_id``; ``rq_l1`` holds ``rq_l1`` and ``hist_rq_l1``), so the target and
the history live in one embedding space.

Arms (the ablation of the QARM paper, one model definition):

=============  ==============================================================================
``id_only``    user id, item id, history of item ids
``frozen_mm``  ``id_only`` + the frozen content embedding as a dense input: the target's from the
               examples, the history items' from a frozen table (the usual cascade: content
               vectors computed once, never updated by the ranker)
``codes``      ``id_only`` + RQ code per level (target and history) + VQ code bag, from the
               aligned embeddings: QARM's trainable quantized codes
``codes_raw``  as ``codes`` with codes fitted on the unaligned embeddings
``codes+frozen`` ``codes`` + the frozen embedding
=============  ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from feature_store.facts import ExamplesFacts
from recsys.config import ARMS, ModelConfig


class FeatureSpecError(ValueError):
    """An arm or feature set the examples cannot serve."""


@dataclass(frozen=True)
class Table:
    name: str
    num_embeddings: int
    dim: int
    #: Features looked up in this table (candidate first, then its history feature).
    features: tuple[str, ...]
    #: ``sequence`` (EmbeddingCollection) or ``bag`` (EmbeddingBagCollection).
    kind: str
    #: Pooling of a bag table: ``sum`` or ``mean``.
    pooling: str = "sum"
    #: Expected ids per example for each feature (the sharding planner's pooling factors).
    ids_per_example: tuple[float, ...] = ()


@dataclass(frozen=True)
class SparseFeature:
    name: str
    table: str
    #: Examples column the ids come from.
    column: str
    #: ``single`` (one id), ``history`` (the history sequence), ``bag`` (a set).
    shape: str
    #: Level of a list<fixed_size_list> code column (RQ), else None.
    level: int | None = None
    #: Ids are taken modulo the table size (hashing); reserved/missing codes (-1) map to the
    #: table's last row.
    hashed: bool = False


@dataclass(frozen=True)
class DenseFeature:
    name: str
    column: str
    dim: int


@dataclass(frozen=True)
class FeatureSpec:
    arm: str
    dim: int
    history_len: int
    levels: int
    tables: tuple[Table, ...]
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...] = field(default_factory=tuple)
    #: Rows of the frozen content table (frozen arms: history items' content vectors are looked
    #: up there by item id; never trained). 0 = no frozen content.
    frozen_rows: int = 0

    @property
    def uses_codes(self) -> bool:
        return self.levels > 0

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    @property
    def sequence_tables(self) -> tuple[Table, ...]:
        return tuple(t for t in self.tables if t.kind == "sequence")

    @property
    def bag_tables(self) -> tuple[Table, ...]:
        return tuple(t for t in self.tables if t.kind == "bag")

    def features_of(self, kind: str) -> tuple[SparseFeature, ...]:
        names = [f for t in self.tables if t.kind == kind for f in t.features]
        by = {f.name: f for f in self.sparse}
        return tuple(by[n] for n in names)

    @property
    def item_parts(self) -> tuple[str, ...]:
        """Tables whose embeddings, concatenated, represent an item (target or history)."""
        return ("item",) + tuple(f"rq_l{lv + 1}" for lv in range(self.levels))

    @property
    def code_columns(self) -> tuple[str, str]:
        """(target, history) examples columns of the RQ codes this spec reads."""
        by = {f.name: f.column for f in self.sparse}
        return by["rq_l1"], by["hist_rq_l1"]

    def columns(self) -> list[str]:
        """Examples columns a batch of this spec reads."""
        cols = {"user_id", "item_id", "label", "hist_item_ids", "cold", "sampled", "ts"}
        cols |= {f.column for f in self.sparse} | {d.column for d in self.dense}
        return sorted(cols)


def build_spec(arm: str, *, dim: int, history_len: int, levels: int, codes_per_level: int,
               n_items: int, n_users: int, item_hash_size: int = 0, user_hash_size: int = 0,
               frozen_dim: int = 0, vq_size: int = 0, mean_history: float | None = None,
               vq_k: float = 10.0) -> FeatureSpec:
    """The spec of one arm. Hash sizes of 0 mean "one row per id" (ids are dense)."""
    if arm not in ARMS:
        raise FeatureSpecError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    if arm in ("frozen_mm", "codes+frozen") and frozen_dim <= 0:
        raise FeatureSpecError(f"arm {arm} needs the frozen embedding in the examples "
                               "(examples.frozen_embedding=true)")
    hist = float(mean_history if mean_history is not None else history_len)
    item_rows = item_hash_size or n_items
    user_rows = user_hash_size or n_users
    tables = [Table("user", user_rows, dim, ("user_id",), "bag", "sum", (1.0,)),
              Table("item", item_rows, dim, ("item_id", "hist_item_id"), "sequence",
                    ids_per_example=(1.0, hist))]
    sparse = [SparseFeature("user_id", "user", "user_id", "single", hashed=True),
              SparseFeature("item_id", "item", "item_id", "single", hashed=True),
              SparseFeature("hist_item_id", "item", "hist_item_ids", "history", hashed=True)]
    use_codes = arm in ("codes", "codes_raw", "codes+frozen")
    if use_codes:
        suffix = "_raw" if arm == "codes_raw" else ""
        for lv in range(levels):
            t = f"rq_l{lv + 1}"
            # One extra row for the reserved "no code" value.
            tables.append(Table(t, codes_per_level + 1, dim, (t, f"hist_{t}"), "sequence",
                                ids_per_example=(1.0, hist)))
            sparse.append(SparseFeature(t, t, f"rq{suffix}", "single", level=lv))
            sparse.append(SparseFeature(f"hist_{t}", t, f"hist_rq{suffix}", "history", level=lv))
        tables.append(Table("vq", vq_size or item_rows, dim, ("vq",), "bag", "mean", (vq_k,)))
        sparse.append(SparseFeature("vq", "vq", f"vq{suffix}", "bag", hashed=True))
    dense = ()
    frozen_rows = 0
    if arm in ("frozen_mm", "codes+frozen"):
        dense = (DenseFeature("frozen", "frozen", frozen_dim),)
        frozen_rows = n_items
    return FeatureSpec(arm, dim, history_len, levels if use_codes else 0, tuple(tables),
                       tuple(sparse), dense, frozen_rows)


def spec_for_examples(arm: str, model: ModelConfig, facts: ExamplesFacts) -> FeatureSpec:
    """The spec of one arm sized for an examples snapshot (its manifest's facts)."""
    if arm == "codes_raw" and not facts.raw_codes:
        raise FeatureSpecError("arm codes_raw needs raw codes in the examples "
                               "(quantize.raw_arm=true), or drop it from train.arms")
    return build_spec(arm, dim=model.dim, history_len=facts.history_len, levels=facts.levels,
                      codes_per_level=facts.codes_per_level, n_items=facts.n_items,
                      n_users=facts.n_users, item_hash_size=model.item_hash_size,
                      user_hash_size=model.user_hash_size, frozen_dim=facts.frozen_dim,
                      mean_history=facts.mean_history, vq_k=max(facts.mean_vq, 1.0))
