"""Polyak averaging of the ranker's weights (``recsys/averaging.py``, ``train.average``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys import averaging
from recsys import checkpoint as ck
from recsys.averaging import WeightAverage
from recsys.config import ModelConfig, TrainConfig
from recsys.features import build_spec
from recsys.job import model_config, spec_from_dict
from recsys.model import build_ranker
from recsys.runner import load_trained, make_job, train_arm
from recsys.testing import random_examples, write_examples
from recsys.train import initial_state


def test_the_average_is_a_normalised_ema_that_swaps_in_and_out_and_thins_out_on_big_models(
        monkeypatch):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    w0 = m.weight.detach().clone()
    avg = WeightAverage(m, 0.9)
    assert avg.every == 1 and avg.decay == pytest.approx(0.9)
    with torch.no_grad():
        m.weight.add_(1.0)
    avg.update(1)
    # The first update takes the live weights whole (the initial ones never weigh in).
    torch.testing.assert_close(avg.avg["weight"], w0 + 1.0)
    with torch.no_grad():
        m.weight.add_(1.0)
    avg.update(2)
    # (0.9 (w0 + 1) + (w0 + 2)) / 1.9
    torch.testing.assert_close(avg.avg["weight"], w0 + 2.9 / 1.9)
    torch.testing.assert_close(avg.avg["bias"], m.bias.detach())   # unmoved: exactly itself
    live = avg.swap_in()
    torch.testing.assert_close(m.weight.detach(), w0 + 2.9 / 1.9)
    avg.swap_out(live)
    torch.testing.assert_close(m.weight.detach(), w0 + 2.0)
    # The horizon is at most one validation interval.
    assert WeightAverage(m, 0.99, max_horizon=10).decay == pytest.approx(0.9)
    assert WeightAverage(m, 0.99, max_horizon=1000).decay == pytest.approx(0.99)

    # 8 values over a budget of 4 per update: every 2nd step, with the decay squared so the
    # horizon in steps stays the same.
    monkeypatch.setattr(averaging, "VALUES_PER_UPDATE", 4)
    avg = WeightAverage(m, 0.9)
    assert avg.every == 2 and avg.decay == pytest.approx(0.81)
    before = avg.avg["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    avg.update(1)
    torch.testing.assert_close(avg.avg["weight"], before)
    avg.update(2)
    torch.testing.assert_close(avg.avg["weight"], before + 1.0)
    with torch.no_grad():
        m.weight.add_(1.0)
    avg.update(4)
    torch.testing.assert_close(avg.avg["weight"], before + 1.0 + 1.0 / 1.81)
    with pytest.raises(ValueError, match="train.average"):
        WeightAverage(m, 1.0)


def _load(folder, job):
    model = build_ranker(spec_from_dict(job.spec), model_config(job.model), "cpu")
    ck.load(folder, {"model": model.state_dict()})
    return model.state_dict()


def test_a_trained_arm_keeps_the_average_of_its_weights_in_checkpoints_and_model(tmp_path):
    """Train 4 steps with ``average`` 0.5 and a checkpoint after every step: ``average_1`` is
    the live weights of ``step_1``, each later ``average_<N>`` the previous average moved by
    w_N = 0.5 / (1 - 0.5^N) towards the live weights of ``step_<N>``, and the saved model is
    the average, not the last weights."""
    spec = build_spec("codes", dim=8, history_len=5, levels=2, codes_per_level=8, n_items=50,
                      n_users=20, vq_k=3)
    train = write_examples(tmp_path / "train", random_examples(1280, seed=1))
    ev = write_examples(tmp_path / "eval", random_examples(100, seed=2))
    cfg = TrainConfig(model=ModelConfig(dim=8, attention_dim=8, cross_rank=8, mlp=[16]),
                      ranks=1, batch_size=64, epochs=1, max_steps=4, checkpoint_every=1,
                      register=False, average=0.5)
    out = tmp_path / "arm"
    train_arm(spec, cfg, train, ev, out, quiet=True)
    job = make_job(spec, cfg, train, ev, out)
    prev = initial_state(job)
    for n in (1, 2, 3):
        w = 0.5 / (1 - 0.5 ** n)
        assert ck.read_meta(out / "checkpoints" / f"step_{n}")["average"] == f"average_{n}"
        live = _load(out / "checkpoints" / f"step_{n}", job)
        got = _load(out / "checkpoints" / f"average_{n}", job)
        moved = 0
        for k, a in got.items():
            if a.is_floating_point():
                torch.testing.assert_close(a, (1 - w) * prev[k] + w * live[k], msg=k)
                moved += int(not torch.equal(live[k], prev[k]))
        assert moved > 0
        prev = got
    # Averaging leaves the training path alone: the same run without it steps through the
    # same live weights, and ends at the live weights of step 4 (no validation). The saved
    # model with averaging is average_3 moved by w_4 = 8/15 towards those.
    plain = tmp_path / "plain"
    train_arm(spec, dataclasses.replace(cfg, average=0.0), train, ev, plain, quiet=True)
    for k, a in _load(plain / "checkpoints" / "step_3", job).items():
        torch.testing.assert_close(a, _load(out / "checkpoints" / "step_3", job)[k], msg=k)
    live4, final = load_trained(plain).state_dict(), load_trained(out).state_dict()
    for k, a in final.items():
        if a.is_floating_point():
            torch.testing.assert_close(a, (7 * prev[k] + 8 * live4[k]) / 15, msg=k)


def test_an_average_outside_0_1_is_a_clear_error(tmp_path):
    spec = build_spec("id_only", dim=8, history_len=5, levels=2, codes_per_level=8, n_items=50,
                      n_users=20)
    with pytest.raises(ValueError, match="train.average must be 0 .off. or a decay in"):
        make_job(spec, TrainConfig(average=1.5), [], [], tmp_path)
