"""Batches for the ranker: Parquet examples → ``RankerBatch`` (KeyedJaggedTensors + dense).

Sharding of the data across ranks: the snapshot's rows, read in file-name order (the examples
stage wrote them in a seeded hash order, so this is a fixed shuffle), are cut into micro-batches of
``micro_batch`` rows; global step ``s`` is micro-batches ``s*W .. s*W+W-1`` and rank ``r`` trains
on the ``r``-th of them. A run with W ranks of micro-batch m therefore sees exactly the global
batches of a 1-rank run with batch W*m, which is what makes 1-rank and 2-rank runs comparable and a
resumed run identical to an uninterrupted one. Each rank streams the files with pyarrow (bounded
memory) and converts only its own micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from feature_store.arrays import list_matrix
from recsys.features import FeatureSpec

MISSING = -1


@dataclass
class RankerBatch(Pipelineable):
    """One micro-batch. ``pooled`` feeds the EmbeddingBagCollection, ``seq`` the
    EmbeddingCollection; ``hist_mask`` [B, N] marks real history positions; ``prefix_mask``
    [B, N, 2] marks history items sharing the target's level-1 / level-1..2 RQ prefix; ``valid``
    is 0 for padding rows (evaluation only)."""

    #: [B] raw item ids of the targets, for non-trainable lookups (the frozen table).
    item_ids: torch.Tensor
    pooled: KeyedJaggedTensor
    seq: KeyedJaggedTensor
    labels: torch.Tensor
    hist_mask: torch.Tensor
    prefix_mask: torch.Tensor
    valid: torch.Tensor
    #: [B, N] raw item ids of the history (0 where padded), for non-trainable lookups.
    hist_ids: torch.Tensor
    #: [T, B, 1 + N]: for each of ``spec.dedup_tables`` (whose ids ``seq`` holds once each),
    #: the positions of the target's and each history item's row among them (padding: one
    #: past the last); see ``_dedup_sequences``.
    seq_index: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankerBatch":
        return RankerBatch(*(getattr(self, f).to(device=device, non_blocking=non_blocking)
                             for f in self.__dataclass_fields__))

    def record_stream(self, stream) -> None:
        for f in self.__dataclass_fields__:
            getattr(self, f).record_stream(stream)

    def pin_memory(self) -> "RankerBatch":
        return RankerBatch(*(getattr(self, f).pin_memory() for f in self.__dataclass_fields__))


def _list_parts(col: pa.ChunkedArray | pa.Array):
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.offset:
        arr = pa.concat_arrays([arr])   # normalise a sliced array so offsets start at 0
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], arr.flatten()


#: Multiplier of the hashed-id bijection (Knuth's multiplicative hash constant, a prime).
_SPREAD = 2654435761


def table_rows(values: np.ndarray, rows: int, hashed: bool) -> np.ndarray:
    v = values.astype(np.int64)
    if hashed:
        # id -> (id mod rows) * A mod rows: a bijection of [0, rows) (A is a prime that does not
        # divide rows), so two ids share a row exactly when plain modulo hashing would put them
        # together, but consecutive ids (popular ones are often the small ones) are spread over
        # the whole table: each row-wise shard gets its share of the hot rows.
        if rows >= 2**32 or rows % _SPREAD == 0:
            return np.mod(v, rows)
        return (np.mod(v, rows).astype(np.uint64) * np.uint64(_SPREAD)
                % np.uint64(rows)).astype(np.int64)
    # Codes: the reserved "no code" value (and anything out of range) takes the last row.
    return np.where((v < 0) | (v >= rows - 1), rows - 1, v)


def to_batch(t: pa.Table, spec: FeatureSpec, pad_to: int | None = None) -> RankerBatch:
    """Convert examples rows to a batch of ``spec``. ``pad_to`` repeats row 0 (valid = 0)."""
    n = t.num_rows
    if pad_to is not None and n < pad_to:
        if n == 0:
            raise ValueError("cannot pad an empty batch")
        t = pa.concat_tables([t, t.take(np.zeros(pad_to - n, np.int64))])
    B = t.num_rows
    valid = np.zeros(B, np.float32)
    valid[:n] = 1.0
    N = spec.history_len
    h_off, h_vals = _list_parts(t.column("hist_item_ids"))
    h_len = np.diff(h_off)
    if h_len.max(initial=0) > N:
        raise ValueError(f"history longer than the spec's history_len {N}: rebuild the "
                         "examples or raise train.model history length")
    row_of = np.repeat(np.arange(B), h_len)
    pos = np.arange(len(row_of)) - h_off[row_of]
    hist_mask = np.zeros((B, N), np.float32)
    hist_mask[row_of, pos] = 1.0
    hist_ids = np.zeros((B, N), np.int64)
    hist_ids[row_of, pos] = h_vals.to_numpy(zero_copy_only=False)
    prefix = np.zeros((B, N, 2), np.float32)
    values: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    ones = np.ones(B, np.int32)
    rq_cand = rq_hist = None
    if spec.uses_codes:
        cand_col, hist_col = spec.code_columns
        if t.column(cand_col).null_count:
            raise ValueError(f"arm {spec.arm} needs column {cand_col}, which is empty in these "
                             "examples (was the raw arm off when they were built?)")
        rq_cand = list_matrix(t.column(cand_col), np.int32)
        _, hv = _list_parts(t.column(hist_col))
        rq_hist = list_matrix(hv, np.int32).reshape(-1, spec.levels)
        c = rq_cand[row_of]
        m1 = (rq_hist[:, 0] == c[:, 0]) & (c[:, 0] != MISSING)
        prefix[row_of, pos, 0] = m1
        if spec.levels > 1:
            prefix[row_of, pos, 1] = m1 & (rq_hist[:, 1] == c[:, 1])
    for f in spec.sparse:
        rows = spec.table(f.table).num_embeddings
        if f.shape == "single" and f.level is None:
            values[f.name] = table_rows(t.column(f.column).to_numpy(), rows, f.hashed)
            lengths[f.name] = ones
        elif f.shape == "single":
            values[f.name] = table_rows(rq_cand[:, f.level], rows, False)
            lengths[f.name] = ones
        elif f.shape == "history" and f.level is None:
            values[f.name] = table_rows(h_vals.to_numpy(zero_copy_only=False), rows, f.hashed)
            lengths[f.name] = h_len.astype(np.int32)
        elif f.shape == "history":
            values[f.name] = table_rows(rq_hist[:, f.level], rows, False)
            lengths[f.name] = h_len.astype(np.int32)
        else:  # bag
            off, vals = _list_parts(t.column(f.column))
            values[f.name] = table_rows(vals.to_numpy(zero_copy_only=False), rows, f.hashed)
            lengths[f.name] = np.diff(off).astype(np.int32)

    index = _dedup_sequences(spec, values, lengths, row_of, pos, B)

    def kjt(feats) -> KeyedJaggedTensor:
        keys = [f.name for f in feats]
        return KeyedJaggedTensor.from_lengths_sync(
            keys, torch.from_numpy(np.concatenate([values[k] for k in keys])),
            torch.from_numpy(np.concatenate([lengths[k] for k in keys])))

    return RankerBatch(
        item_ids=torch.from_numpy(t.column("item_id").to_numpy().astype(np.int64)),
        pooled=kjt(spec.features_of("bag")),
        seq=kjt(spec.features_of("sequence")),
        labels=torch.from_numpy(t.column("label").to_numpy().astype(np.float32)),
        hist_mask=torch.from_numpy(hist_mask), prefix_mask=torch.from_numpy(prefix),
        valid=torch.from_numpy(valid), hist_ids=torch.from_numpy(hist_ids),
        seq_index=torch.from_numpy(index))


def _dedup_sequences(spec: FeatureSpec, values: dict, lengths: dict, row_of: np.ndarray,
                     pos: np.ndarray, B: int) -> np.ndarray:
    """Rewrite the features of each of ``spec.dedup_tables`` in place so the batch looks each
    distinct id up once (the target feature holds them all, as one example's list; the
    history feature is empty), and return the [T, B, 1 + N] positions of every example's
    target and history rows among them (padding: one past the last). TorchRec's index dedup,
    which fbgemm's CPU kernels lack: a row's gradient is the same sum over its uses, the fused
    optimizer updates fewer rows and row-wise sharding sends fewer ids and rows."""
    N = spec.history_len
    out = []
    for t in spec.dedup_tables:
        cand, hist = t.features
        ids = np.concatenate([values[cand], values[hist]])
        seen = np.zeros(t.num_embeddings, bool)
        seen[ids] = True
        inv = (np.cumsum(seen) - 1)[ids]
        uniq = np.flatnonzero(seen)
        idx = np.full((B, 1 + N), len(uniq), np.int64)
        idx[:, 0] = inv[:B]
        idx[row_of, 1 + pos] = inv[B:]
        out.append(idx)
        values[cand], values[hist] = uniq, np.zeros(0, np.int64)
        first = np.zeros(B, np.int32)
        first[0] = len(uniq)
        lengths[cand], lengths[hist] = first, np.zeros(B, np.int32)
    return np.stack(out) if out else np.zeros((0, B, N + 1), np.int64)


def count_rows(files: Sequence[str]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


def micro_batches(files: Sequence[str], columns: list[str], micro: int,
                  read_batch: int = 8192) -> Iterator[pa.Table]:
    """The files' rows, in order, as consecutive tables of exactly ``micro`` rows (the last may
    be shorter), streamed."""
    return rechunk((pa.Table.from_batches([rb]) for f in files
                    for rb in pq.ParquetFile(f).iter_batches(batch_size=read_batch,
                                                             columns=columns)), micro)


def shuffled_tables(files: Sequence[str], columns: list[str], seed: int,
                    buffer_rows: int = 65_536) -> Iterator[pa.Table]:
    """The files' rows in a seeded order, streamed: row groups in a random order, then rows
    shuffled within a buffer of ``buffer_rows``. The same seed gives the same order on every
    rank, whatever the number of ranks."""
    rng = np.random.default_rng(seed)
    readers = {f: pq.ParquetFile(f) for f in files}
    units = [(f, g) for f in files for g in range(readers[f].num_row_groups)]
    buf: list[pa.Table] = []
    have = 0
    for i in rng.permutation(len(units)):
        f, g = units[i]
        t = readers[f].read_row_group(g, columns=columns)
        buf.append(t)
        have += t.num_rows
        if have >= buffer_rows:
            big = pa.concat_tables(buf)
            yield big.take(rng.permutation(big.num_rows))
            buf, have = [], 0
    if have:
        big = pa.concat_tables(buf)
        yield big.take(rng.permutation(big.num_rows))


def rechunk(tables: Iterator[pa.Table], micro: int) -> Iterator[pa.Table]:
    """Consecutive tables of exactly ``micro`` rows (the last may be shorter)."""
    buf: list[pa.Table] = []
    have = 0
    for t in tables:
        buf.append(t)
        have += t.num_rows
        while have >= micro:
            t = pa.concat_tables(buf)
            yield t.slice(0, micro)
            rest = t.slice(micro)
            buf, have = [rest], rest.num_rows
    if have:
        yield pa.concat_tables(buf)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@dataclass
class ShardPlan:
    rows: int
    micro: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.world

    @property
    def steps_per_epoch(self) -> int:
        """Training steps (full global batches; the remainder is dropped)."""
        return self.rows // self.global_batch

    @property
    def eval_steps(self) -> int:
        """Evaluation steps: every row scored once, the last round padded."""
        return -(-(-(-self.rows // self.micro)) // self.world)


def train_batches(files: Sequence[str], spec: FeatureSpec, plan: ShardPlan, rank: int,
                  epochs: int, start_step: int = 0, end_step: int | None = None,
                  seed: int = 0) -> Iterator[RankerBatch]:
    """This rank's training micro-batches for global steps ``start_step .. end_step - 1``; each
    epoch reads the rows in its own seeded order (``shuffled_tables``)."""
    cols = spec.columns()
    spe = plan.steps_per_epoch
    end = spe * epochs if end_step is None else min(end_step, spe * epochs)
    for epoch in range(start_step // spe, -(-end // spe)):
        first = start_step - epoch * spe if epoch == start_step // spe else 0
        last = min(spe, end - epoch * spe)
        rows = rechunk(shuffled_tables(files, cols, epoch_seed(seed, epoch)), plan.micro)
        for j, t in enumerate(rows):
            step, r = divmod(j, plan.world)
            if step >= last:
                break
            if step < first or r != rank:
                continue
            yield to_batch(t, spec)


def eval_batches(files: Sequence[str], spec: FeatureSpec, plan: ShardPlan, rank: int,
                 extra_columns: Sequence[str] = ()) -> Iterator[tuple[RankerBatch, pa.Table]]:
    """This rank's evaluation micro-batches, all ``micro`` rows (padding rows have valid = 0),
    with the example rows they came from. Every rank yields ``plan.eval_steps`` batches."""
    cols = sorted(set(spec.columns()) | set(extra_columns))
    done = 0
    first = None
    for j, t in enumerate(micro_batches(files, cols, plan.micro)):
        if first is None:
            first = t
        if j % plan.world == rank:
            yield to_batch(t, spec, pad_to=plan.micro), t
            done += 1
    while done < plan.eval_steps:   # ranks without a last micro-batch score padding
        yield to_batch(first.slice(0, 1), spec, pad_to=plan.micro), first.slice(0, 0)
        done += 1
