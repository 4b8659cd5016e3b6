"""GMU video grounding: metrics, the model's parts, the grounding data (synthetic and
Charades-STA), training on a small synthetic set, the multi-event world and the highlight cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm_encoder.config import GroundingConfig
from mm_encoder.gmu import (GMU, GroundingError, GroundingSet, grounding_metrics, predict,
                            proposals, temporal_iou, train_gmu, trivial_spans)


def test_temporal_iou_properties():
    rng = np.random.default_rng(0)
    a = np.sort(rng.random((500, 2)), 1)
    b = np.sort(rng.random((500, 2)), 1)
    iou = temporal_iou(a, b)
    assert np.allclose(iou, temporal_iou(b, a))                          # symmetric
    assert ((iou >= 0) & (iou <= 1)).all()
    assert np.allclose(temporal_iou(a, a), 1.0)
    assert temporal_iou([0.3, 0.3], [0.3, 0.3]) == 1.0                   # zero length, same
    assert temporal_iou([0.0, 0.2], [0.5, 0.9]) == 0.0                   # disjoint
    assert temporal_iou([0.0, 0.5], [0.5, 1.0]) == 0.0                   # touching
    assert temporal_iou([0.0, 0.4], [0.2, 0.6]) == pytest.approx(0.2 / 0.6)


def test_recall_at_iou_zero_is_100_and_metrics_by_hand():
    rng = np.random.default_rng(1)
    truth = np.sort(rng.random((50, 2)), 1)
    pred = np.sort(rng.random((50, 5, 2)), -1)
    assert grounding_metrics(pred, truth, ious=(0.0,))["R@1@0.0"] == 100.0
    truth = np.array([[0.0, 0.5], [0.5, 1.0]])
    pred = np.array([[[0.0, 0.5], [0.6, 0.9]], [[0.0, 0.2], [0.5, 0.9]]])
    m = grounding_metrics(pred, truth, ious=(0.5,), ks=(1, 2))
    assert m["R@1@0.5"] == 50.0 and m["R@2@0.5"] == 100.0
    assert m["mIoU"] == pytest.approx(50.0)
    base = trivial_spans(np.array([[0.0, 0.2], [0.4, 0.8]]), 3)
    assert np.allclose(base, [[0.2, 0.5]] * 3)          # mean length 0.3 at mean centre 0.35


def _fake(n_videos=6, per=2, T=12, d=10, h=7, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n_videos, T, d, generator=g)
    fmask = torch.ones(n_videos, T, dtype=torch.bool)
    fmask[0, 9:] = False                                   # a shorter video
    n = n_videos * per
    tokens, tmask = torch.randn(n, L, h, generator=g), torch.ones(n, L, dtype=torch.bool)
    spans = np.sort(np.random.default_rng(seed).random((n, 2)), 1) * 0.7
    return GroundingSet(frames, fmask, tokens, tmask, spans,
                        np.repeat(np.arange(n_videos), per))


@pytest.mark.parametrize("parts", [dict(), dict(generator=False), dict(clip=False),
                                   dict(moment=False), dict(moment=False, generator=False),
                                   dict(clip=False, generator=False)])
def test_output_shapes_and_each_part_switches_off(parts):
    cfg = GroundingConfig(max_frames=12, dim=16, heads=2, layers=1, **parts)
    data = _fake()
    model = GMU(cfg, 10, 7)
    out = model(*data.batch(np.arange(4)))
    P = len(proposals(12, cfg.windows))
    has_moment = cfg.moment or cfg.generator
    has_clip = cfg.clip or cfg.generator
    assert ("start" in out) == has_moment and ("clip" in out) == has_clip
    assert ("generated" in out) == cfg.generator
    if has_moment:
        assert out["start"].shape == out["end"].shape == (4, 12)
        assert (out["start"][0, 9:] < -1e3).all()          # padded steps are never boundaries
    if has_clip:
        assert out["clip"].shape == (4, P)
    assert model.proposal_scores(out).shape == (4, P)
    spans = predict(model, data, top=3)
    assert spans.shape == (len(data), 3, 2)
    assert (spans[:, :, 0] < spans[:, :, 1]).all() and (spans >= 0).all() and (spans <= 1).all()
    # Shares of each video's own steps: the 9-step video's spans fall on ninths.
    assert np.allclose(spans[:2] * 9, np.round(spans[:2] * 9))


def test_both_levels_off_is_refused():
    with pytest.raises(GroundingError, match="moment level or the clip level"):
        GMU(GroundingConfig(moment=False, clip=False), 4, 4)


def test_proposals_cover_every_start_of_each_window():
    p = proposals(8, [0.25, 0.5])
    assert {(int(s), int(e)) for s, e in p} == {*((s, s + 1) for s in range(7)),
                                                 *((s, s + 3) for s in range(5))}


def test_charades_sta_loader_on_a_hand_written_file(tmp_path):
    from mm_encoder.towers import TextTower
    from pipelines.grounding import parse_charades_sta, read_charades_sta

    (tmp_path / "feats").mkdir()
    np.save(tmp_path / "feats" / "AO8RW.npy", np.random.default_rng(0).random((40, 6)))
    np.save(tmp_path / "feats" / "Y6R7T.npy", np.random.default_rng(1).random((10, 6)))
    (tmp_path / "durations.csv").write_text("id,length\nAO8RW,33.67\nY6R7T,20.0\n")
    ann = tmp_path / "charades_sta_test.txt"
    ann.write_text("AO8RW 0.0 6.9##a person is putting a book on a shelf.\n"
                   "AO8RW 5.2 12.8##person begins to play on a phone.\n"
                   "\n"
                   "Y6R7T 3.0 9.0##a person opens the door\n"
                   "Y6R7T 15.0 25.0##a person runs away\n"        # ends after the video
                   "ZZZZZ 1.0 2.0##no features for this video\n"
                   "AO8RW 7.0 3.0##reversed\n"
                   "AO8RW seven 9##not a number\n"
                   "AO8RW 1.0 2.0 a line without the separator\n")
    parsed = parse_charades_sta(ann)
    assert parsed.lines == 8 and len(parsed.queries) + len(parsed.rejected) == 8
    assert [r[0] for r in parsed.rejected] == [7, 8, 9]
    data, info = read_charades_sta(ann, tmp_path / "feats", tmp_path / "durations.csv",
                                   TextTower(), max_frames=16, max_tokens=12)
    assert len(data) == 3 and len(info.rejected) == 5            # 8 lines = 3 + 5
    reasons = " | ".join(r[2] for r in info.rejected)
    assert "after the video" in reasons and "no duration" in reasons
    assert np.allclose(data.spans[0], [0.0, 6.9 / 33.67])
    assert data.frames.shape == (2, 16, 6) and data.fmask.sum(1).tolist() == [16, 10]
    assert data.video.tolist() == [0, 0, 1] and data.tokens.shape[:2] == (3, 12)


def test_trained_on_small_synthetic_videos_it_beats_the_trivial_baseline():
    from mm_encoder.towers import MobileNetV2Tower, TextTower
    from pipelines.grounding import synthetic_set

    torch.set_num_threads(2)
    data = synthetic_set(120, 16, 24, 5, MobileNetV2Tower(image_size=32), TextTower(), 12)
    assert data.frames.shape[:2] == (120, 16) and len(data) >= 240
    cfg = GroundingConfig(max_frames=16, dim=32, layers=1, epochs=25, batch_size=32,
                          holdout=0.25)
    res = train_gmu(data, cfg)
    assert res.held_out > 40 and res.losses[-1] < res.losses[0]
    assert res.metrics["mIoU"] > res.trivial["mIoU"] + 10, (res.metrics, res.trivial)
    assert res.metrics["R@1@0.5"] > res.trivial["R@1@0.5"] + 10


def test_synthetic_videos_hold_their_events_one_after_another():
    from pipelines.synthetic_events import grounding_videos

    videos, events = grounding_videos(3, 20, 24, 24)
    for v, evs in zip(videos, events):
        assert v.shape == (24, 24, 24, 3) and 2 <= len(evs) <= 4
        assert all(e.end - e.start + 1 >= 1 for e in evs)
        assert all(a.end < b.start for a, b in zip(evs, evs[1:]))
        assert len({(e.shape, e.colour) for e in evs}) == len(evs)   # distinguishable
        for e in evs:                           # an event's frames differ from the idle ones
            assert v[e.start].std() > 0


def test_multi_event_items_name_their_own_event_in_the_title():
    from pipelines import synthetic as s
    from pipelines.config import WorldConfig

    cfg = WorldConfig(n_items=40, video_frames=12, multi_event_share=0.5)
    lat = s.draw_latents(cfg)
    multi = [i for i in range(40) if s.multi_event_plan(cfg, i, lat) is not None]
    assert 10 <= len(multi) <= 30
    for i in multi:
        plan = s.multi_event_plan(cfg, i, lat)
        own = [e for e in plan if (e.shape, e.motion, e.colour) == (
            lat.shape[i], lat.motion[i], lat.colour[i])]
        assert len(own) == 1 and s._text(cfg, i, lat)[0] == own[0].caption
        assert len(s.render_item(cfg, i, lat)[1]) == 12
    single = next(i for i in range(40) if i not in multi)
    assert not s._text(cfg, single, lat)[0].startswith("a ")
    # Off (the default): the world is unchanged.
    plain = WorldConfig(n_items=40, video_frames=12)
    assert s.multi_event_plan(plain, multi[0], s.draw_latents(plain)) is None


def test_highlight_cut_of_item_videos_in_spark(spark):
    import pyarrow as pa

    from jobs.stages.embed import highlight_videos

    items = spark.createDataFrame(pa.table({
        "item_id": [1, 2, 3], "video": [[bytes([i]) for i in range(10)],
                                        [bytes([i]) for i in range(4)], None]}).to_pandas())
    h = spark.createDataFrame([(1, 0.2, 0.5, 1.0), (3, 0.0, 1.0, 1.0)],
                              "item_id long, highlight_start double, highlight_end double, "
                              "score double")
    got = {r.item_id: r.video for r in highlight_videos(items, h).collect()}
    assert [b[0] for b in got[1]] == [2, 3, 4]
    assert len(got[2]) == 4 and got[3] is None
