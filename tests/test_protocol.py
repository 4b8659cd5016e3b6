"""The evaluation protocol through the real DAG, in both split modes: nothing of a user's
validation or test part reaches pair mining, alignment or the training examples; validation and
test never overlap; unusable data stops with a one-line typed error."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from feature_store import schemas
from feature_store.facts import SplitFacts
from jobs.cli import main
from jobs.config import load_config
from jobs.stages import build_dag
from tests.conftest import tiny_world_overrides

DS = "2026-01-31"
SMALL = ["world.n_users=80", "world.impressions_per_user=60", "encoder.image_size=32",
         "encoder.dim=16", "embed.partitions=2", "pairs.min_support=1", "align.epochs=1",
         "quantize.rq.codes=8", "quantize.rq.levels=2", "quantize.vq.k=5",
         "quantize.partitions=2", "examples.partitions=2", "mlflow.enabled=false"]


def _overrides(root, mode):
    return tiny_world_overrides(root) + SMALL + [f"split.mode={mode}"]


def _args(overrides, *extra):
    out = []
    for o in overrides:
        out += ["--set", o]
    return [*out, "--ds", DS, "--no-progress", *extra]


def _rows(store, table, snapshot_id, keys):
    t = store.read_arrow(table, snapshot_id).to_pandas()
    return t.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module", params=["global_time", "per_user"])
def tampered(request, spark, tmp_path_factory):
    """The DAG through ``examples``; then the validation and test events are rewritten (other
    items) in a new split snapshot and pairs, align and examples run again on it. Returns the
    store and the (first, second) output snapshot of each of those tables."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"protocol-{mode}") / "q"
    overrides = _overrides(root, mode)
    assert main(["run", *_args(overrides, "--until", "examples")]) == 0
    dag = build_dag(load_config(None, overrides))
    store = dag.store
    watched = ("item_pairs", "aligned_item_embeddings", "train_examples", "valid_examples",
               "eval_examples")
    first = {t: store.get(t) for t in watched}
    split = store.get("split_events")
    events = store.read_arrow("split_events", split.snapshot_id).to_pandas()
    later = events.part != "train"
    n_items = int(events.item_id.max()) + 1
    events.loc[later, "item_id"] = (events.loc[later, "item_id"] + 7) % n_items
    events = events.drop_duplicates(["user_id", "item_id", "ts"])
    changed = store.write_table("split_events", pa.Table.from_pandas(events, preserve_index=False),
                                schema=schemas.split_events_schema(),
                                facts=split.facts_of(SplitFacts))
    now = time.time()
    dag.state.record(ds=DS, stage="split", status="done", input_key="tampered", inputs={},
                     outputs={"split_events": changed.ref}, metrics={}, mlflow_run_id=None,
                     started=now, finished=now, error=None)
    for stage in ("pairs", "align", "examples"):
        assert main([stage, *_args(overrides)]) == 0
    second = {t: store.get(t) for t in watched}
    return mode, store, first, second, events


def test_validation_and_test_events_never_reach_pairs_alignment_or_training(tampered):
    mode, store, first, second, _ = tampered
    for table in first:
        assert first[table].snapshot_id != second[table].snapshot_id, table   # they re-ran
    keys = ["source", "src", "dst"]
    pd.testing.assert_frame_equal(_rows(store, "item_pairs", first["item_pairs"].snapshot_id, keys),
                                  _rows(store, "item_pairs", second["item_pairs"].snapshot_id,
                                        keys))
    a, b = (store.read_arrow("aligned_item_embeddings", m.snapshot_id).sort_by("item_id")
            for m in (first["aligned_item_embeddings"], second["aligned_item_embeddings"]))
    np.testing.assert_allclose(np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(b.column("embedding").to_numpy(zero_copy_only=False)),
                               atol=1e-6)
    keys = [(k, "ascending") for k in ("user_id", "item_id", "ts", "sampled")]
    tr1, tr2 = (store.read_arrow("train_examples", m.snapshot_id).sort_by(keys)
                for m in (first["train_examples"], second["train_examples"]))
    assert tr1.num_rows and set(tr1.column("part").to_pylist()) == {"train"}
    assert tr1.equals(tr2)
    # The tampering did reach what is scored: the test examples changed.
    te1, te2 = (store.read_arrow("eval_examples", m.snapshot_id).sort_by(keys)
                for m in (first["eval_examples"], second["eval_examples"]))
    assert te1.column("item_id").to_pylist() != te2.column("item_id").to_pylist()


def test_validation_never_overlaps_the_test_part(tampered):
    mode, store, first, _, _ = tampered
    va = store.read_arrow("valid_examples", first["valid_examples"].snapshot_id).to_pandas()
    te = store.read_arrow("eval_examples", first["eval_examples"].snapshot_id).to_pandas()
    tr = store.read_arrow("train_examples", first["train_examples"].snapshot_id).to_pandas()
    assert len(va) and len(te)
    key = ["user_id", "item_id", "ts"]
    assert not set(map(tuple, va[key].values)) & set(map(tuple, te[key].values))
    if mode == "global_time":
        assert tr.ts.max() < va.ts.min() and va.ts.max() < te.ts.min()
    else:
        for user, g in te.groupby("user_id"):
            v, t = va[va.user_id == user], tr[tr.user_id == user]
            assert len(v) and v.ts.max() <= g.ts.min() and t.ts.max() <= v.ts.min()
        # Every user with at least 3 positives is evaluated, and only those.
        split = store.read_arrow("split_events").to_pandas()
        n_pos = split[split.label == 1].groupby("user_id").size()
        assert set(te.user_id) == set(n_pos[n_pos >= 3].index)


def _generic(tmp_path, events_rows, events_header=("user_id", "item_id", "ts", "label")):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{k},Item {k}\n" for k in range(6)))
    events = tmp_path / "events.csv"
    events.write_text(",".join(events_header) + "\n" +
                      "".join(",".join(map(str, r)) + "\n" for r in events_rows))
    return [f"paths.root={tmp_path / 'q'}", "source.kind=generic", f"source.items={items}",
            f"source.events={events}", "mlflow.enabled=false", "ingest.image_partitions=2",
            "spark.shuffle_partitions=2", "encoder.image_tower=none"]


@pytest.mark.parametrize("rows, extra, until, message", [
    ([], [], "ingest", "UnusableData: the events input has no rows"),
    ([("u1", "i1", "2026-01-01T00:00:00Z", 1), ("u2", "i2", "2026-01-01T00:00:00Z", 0)], [],
     "split", "UnusableData: the global_time split leaves the train part empty"),
    ([("u1", "i1", f"2026-01-0{d}T00:00:00Z", 1) for d in range(1, 3)]
     + [("u2", "i3", "2026-01-05T00:00:00Z", 1)], ["split.mode=per_user"],
     "split", "UnusableData: the per_user split needs users with at least 3 positives"),
    ([("u1", f"i{k}", f"2026-01-0{k + 1}T00:00:00Z", 1) for k in range(6)],
     ["examples.negatives=never", "split.valid_share=0.3", "quantize.rq.codes=2",
      "quantize.rq.levels=1", "quantize.vq.k=2", "quantize.raw_arm=false"], "examples",
     "UnusableData: the training part has only positive events and examples.negatives is never"),
])
def test_unusable_data_stops_with_a_one_line_typed_error(spark, tmp_path, capsys, rows, extra,
                                                         until, message):
    overrides = _generic(tmp_path, rows) + extra
    assert main(["run", *_args(overrides, "--until", until)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
