"""The quantize stage codes every item; --assign-only with the fitted version gives the same codes."""

from __future__ import annotations

import numpy as np

from feature_store.snapshots import SnapshotStore
from jobs.cli import main
from tests.conftest import tiny_world_overrides


def _args(root, *extra):
    out = []
    for o in tiny_world_overrides(root) + ["encoder.image_size=32", "encoder.dim=16",
                                           "embed.partitions=2", "quantize.rq.codes=8",
                                           "quantize.rq.levels=2", "quantize.vq.k=5",
                                           "quantize.partitions=3"]:
        out += ["--set", o]
    return [*out, "--ds", "2026-01-31", "--no-progress", *extra]


def _codes(store, snapshot_id):
    t = store.read_arrow("item_codes", snapshot_id).sort_by("item_id")
    return (t.column("item_id").to_numpy(), np.stack(t.column("rq").to_numpy(zero_copy_only=False)),
            np.stack(t.column("vq").to_numpy(zero_copy_only=False)),
            set(t.column("codebook_version").to_pylist()))


def test_fit_then_assign_only_gives_the_same_codes(spark, tmp_path, capsys):
    root = tmp_path / "q"
    assert main(["run", *_args(root, "--until", "quantize")]) == 0
    out = capsys.readouterr().out
    assert "utilization" in out and "collision" in out  # the metrics table is printed
    store = SnapshotStore(str(root / "store"))
    fitted = store.get("item_codes")
    version = fitted.extra["codebook_version"]
    ids, rq, vq, versions = _codes(store, fitted.snapshot_id)
    assert len(ids) == store.get("items").row_count == 120
    assert versions == {version} and rq.shape == (120, 2) and vq.shape == (120, 5)
    assert rq.max() < 8 and (vq >= 0).all()

    assert main(["quantize", *_args(root, "--assign-only", "--codebook", version)]) == 0
    assert "existing, assign-only" in capsys.readouterr().out
    again = store.get("item_codes")
    assert again.snapshot_id != fitted.snapshot_id and again.extra["fitted"] is False
    ids2, rq2, vq2, versions2 = _codes(store, again.snapshot_id)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(rq, rq2)
    np.testing.assert_array_equal(vq, vq2)
    assert versions2 == {version}

    assert main(["quantize", *_args(root, "--codebook", "cb-nope")]) == 2
    assert "no codebook cb-nope" in capsys.readouterr().err
    assert main(["quantize", *_args(root, "--assign-only")]) == 2
    assert "needs --codebook" in capsys.readouterr().err
