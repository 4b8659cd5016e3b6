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
``frozen_mm``  ``id_only`` + the frozen *raw* content embedding (the usual cascade: content
               vectors computed once by the encoder, never updated by the ranker)
``frozen_aligned`` ``id_only`` + the frozen *aligned* embedding (alignment without trainability)
``codes``      ``id_only`` + RQ code per level (target and history) + VQ code bag, from the
               aligned embeddings: QARM's trainable quantized codes
``codes_raw``  as ``codes`` with codes fitted on the unaligned embeddings
``codes+frozen`` ``codes`` + the frozen raw embedding
=============  ==============================================================================

``frozen_mm``/``frozen_aligned``/``codes_raw``/``codes`` are the 2x2 of raw/aligned x
frozen/trainable. The frozen arms get the code arms' capacity: each item's frozen vector
(looked up by item id in a non-trainable table, for the target and the history) is projected to
the width of the RQ parts (plus, for the target, one more projection in place of the VQ bag),
so every arm's dense input has the same width; and the prefix-matched
history pools have a *similarity-matched* analogue: the history items whose cosine with the
target passes the thresholds at which random item pairs match as often as they would share a
level-1 (level-1..2) code of a uniform codebook of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

from feature_store.facts import ExamplesFacts
from recsys.config import ARMS, ModelConfig


#: Which content vectors each frozen arm reads.
FROZEN_SOURCE = {"frozen_mm": "raw", "frozen_aligned": "aligned", "codes+frozen": "raw"}


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


#: Sequence tables up to this many rows (code tables, small catalogues) are looked up once
#: per distinct id of a batch: their ids repeat across the batch's targets and histories, and
#: finding the distinct ones is a pass over a mask of the rows. Measured on 2 cores (codes arm,
#: 1,500 items, 3 x 32 codes): 2 ranks +4% examples/s at global batch 512, +15% at 2,048; a
#: 1M-item table keeps the plain layout (its ids rarely repeat within a batch).
DEDUP_MAX_ROWS = 1 << 16


@dataclass(frozen=True)
class FeatureSpec:
    arm: str
    dim: int
    history_len: int
    levels: int
    tables: tuple[Table, ...]
    sparse: tuple[SparseFeature, ...]
    #: Rows and width of the frozen content table (frozen arms: the target's and the history
    #: items' content vectors are looked up there by item id; never trained). 0 = none.
    frozen_rows: int = 0
    frozen_dim: int = 0
    #: ``raw`` or ``aligned`` content vectors in the frozen table ("" = none).
    frozen_source: str = ""
    #: Width of the frozen projection in an item's vector, in slots of ``dim`` (the RQ levels
    #: for the frozen arms, 1 for ``codes+frozen``).
    frozen_slots: int = 0
    #: Cosine thresholds of the similarity-matched history pools (frozen arms without codes).
    match_thresholds: tuple[float, ...] = ()
    #: The target's predicted tags are a bag feature: the ``pred_tags`` table has a row per tag
    #: of this vocabulary (the examples' indices; serving maps tags with it). Empty: no feature.
    pred_tag_vocab: tuple[str, ...] = ()
    #: Batches look each id of a small sequence table (``DEDUP_MAX_ROWS``) up once and carry
    #: where each example's rows are among them (``recsys.data._dedup_sequences``); the
    #: TorchRec model gathers the examples' rows back. Off: one lookup per id occurrence, in
    #: the jagged layout (what ``PlainSparse`` reads).
    dedup_ids: bool = True

    def dedups(self, table: Table) -> bool:
        """Whether batches of this spec look ``table``'s ids up once each."""
        return (self.dedup_ids and table.kind == "sequence"
                and table.num_embeddings <= DEDUP_MAX_ROWS)

    @property
    def dedup_tables(self) -> tuple[Table, ...]:
        return tuple(t for t in self.sequence_tables if self.dedups(t))

    @property
    def uses_pred_tags(self) -> bool:
        return bool(self.pred_tag_vocab)

    @property
    def uses_codes(self) -> bool:
        return self.levels > 0

    @property
    def uses_frozen(self) -> bool:
        return self.frozen_rows > 0

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
        cols |= {f.column for f in self.sparse}
        return sorted(cols)


def build_spec(arm: str, *, dim: int, history_len: int, levels: int, codes_per_level: int,
               n_items: int, n_users: int, item_hash_size: int = 0, user_hash_size: int = 0,
               frozen_dim: int = 0, vq_size: int = 0, mean_history: float | None = None,
               vq_k: float = 10.0, match_thresholds: tuple[float, ...] = (),
               pred_tag_vocab: tuple[str, ...] = (), mean_pred_tags: float = 1.0
               ) -> FeatureSpec:
    """The spec of one arm. Hash sizes of 0 mean "one row per id" (ids are dense).
    ``frozen_dim``: width of the frozen content vectors (frozen arms). ``pred_tag_vocab``: the
    predicted tags' vocabulary when the target's predicted tags are a feature (empty: not)."""
    if arm not in ARMS:
        raise FeatureSpecError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    if arm in FROZEN_SOURCE and frozen_dim <= 0:
        raise FeatureSpecError(f"arm {arm} needs the frozen embedding table (its width is 0)")
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
    if pred_tag_vocab:
        # Mean-pooled: an item's vector of tags does not grow with how many were predicted.
        # One extra row: indices outside the vocabulary map there.
        tables.append(Table("pred_tags", len(pred_tag_vocab) + 1, dim, ("pred_tags",), "bag", "mean",
                            (max(mean_pred_tags, 1.0),)))
        sparse.append(SparseFeature("pred_tags", "pred_tags", "pred_tags", "bag"))
    source = FROZEN_SOURCE.get(arm, "")
    slots = 0
    if source:
        slots = 1 if use_codes else max(levels, 1)
    if source and not use_codes and len(match_thresholds) != 2:
        raise FeatureSpecError(f"arm {arm} needs 2 similarity thresholds (match_thresholds)")
    return FeatureSpec(arm, dim, history_len, levels if use_codes else 0, tuple(tables),
                       tuple(sparse), frozen_rows=n_items if source else 0,
                       frozen_dim=frozen_dim if source else 0, frozen_source=source,
                       frozen_slots=slots,
                       match_thresholds=tuple(match_thresholds) if source and not use_codes
                       else (), pred_tag_vocab=tuple(pred_tag_vocab))


def spec_for_examples(arm: str, model: ModelConfig, facts: ExamplesFacts, frozen_dim: int = 0,
                      match_thresholds: tuple[float, ...] = ()) -> FeatureSpec:
    """The spec of one arm sized for an examples snapshot (its manifest's facts); frozen arms
    also need the width of their content table and the similarity thresholds."""
    if arm == "codes_raw" and not facts.raw_codes:
        raise FeatureSpecError("arm codes_raw needs raw codes in the examples "
                               "(quantize.raw_arm=true), or drop it from train.arms")
    if model.pred_tags and not facts.pred_tag_vocab:
        raise FeatureSpecError("train.model.pred_tags needs predicted tags in the examples: "
                               "enable the pretrain stage (pretrain.enabled=true) and re-run "
                               "examples, or set train.model.pred_tags=false")
    return build_spec(arm, dim=model.dim, history_len=facts.history_len, levels=facts.levels,
                      codes_per_level=facts.codes_per_level, n_items=facts.n_items,
                      n_users=facts.n_users, item_hash_size=model.item_hash_size,
                      user_hash_size=model.user_hash_size, frozen_dim=frozen_dim,
                      mean_history=facts.mean_history, vq_k=max(facts.mean_vq, 1.0),
                      match_thresholds=match_thresholds,
                      pred_tag_vocab=facts.pred_tag_vocab if model.pred_tags else (),
                      mean_pred_tags=facts.mean_pred_tags)


def match_thresholds(table, codes_per_level: int, seed: int = 0,
                     pairs: int = 200_000) -> tuple[float, ...]:
    """Cosine thresholds at which random pairs of distinct items match as often as they would
    share a level-1 (level-1..2) code of a uniform codebook of ``codes_per_level`` codes: the
    frozen arms' analogue of the prefix-matched history. ``table``: (items, D) content vectors
    (zero rows, items without a vector, are left out)."""
    import numpy as np

    x = np.asarray(table, np.float32)
    x = x[np.linalg.norm(x, axis=1) > 0]
    if len(x) < 2:
        raise FeatureSpecError("the frozen table has fewer than 2 non-zero vectors")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(x), pairs), rng.integers(0, len(x), pairs)
    keep = a != b
    cos = np.einsum("ij,ij->i", x[a[keep]], x[b[keep]])
    return tuple(float(np.quantile(cos, 1.0 - float(codes_per_level) ** -(k + 1)))
                 for k in range(2))
