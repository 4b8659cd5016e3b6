from __future__ import annotations

import pytest

from jobs.config import ConfigError, load_config


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg.source.kind == "synthetic"
    assert cfg.spark.master == "local[*]"


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("spark:\n  mastr: local[2]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'spark.mastr' \(did you mean 'spark.master'"):
        load_config(p)


def test_wrong_type_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("world:\n  n_items: lots\n")
    with pytest.raises(ConfigError, match="world.n_items must be an integer"):
        load_config(p)


def test_literal_choice_is_checked():
    with pytest.raises(ConfigError, match="source.kind must be one of"):
        load_config(None, ["source.kind=csv"])


def test_set_overrides_parse_yaml_values():
    cfg = load_config(None, ["world.n_items=77", "world.train_share=0.5", "mlflow.enabled=false",
                             "spark.conf={spark.executor.cores: 2}"])
    assert cfg.world.n_items == 77 and isinstance(cfg.world.n_items, int)
    assert cfg.world.train_share == 0.5
    assert cfg.mlflow.enabled is False
    assert cfg.spark.conf == {"spark.executor.cores": "2"}


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; a learning rate written that way
    # is still a number, and a word is still refused.
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  dense_lr: 1e-3\n")
    cfg = load_config(p, ["train.sparse_lr=2E-1", "world.train_share=8e-1"])
    assert cfg.train.dense_lr == 1e-3 and isinstance(cfg.train.dense_lr, float)
    assert cfg.train.sparse_lr == 0.2 and cfg.world.train_share == 0.8
    with pytest.raises(ConfigError, match="train.dense_lr must be a number, got '1e'"):
        load_config(None, ["train.dense_lr=1e"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["world.n_items"])


def test_section_hash_changes_only_with_its_sections():
    a = load_config(None)
    b = load_config(None, ["world.seed=5"])
    assert a.section_hash("ingest") == b.section_hash("ingest")
    assert a.section_hash("world") != b.section_hash("world")


@pytest.mark.parametrize("key, bad", [
    ("align.loss", "dsL"), ("quantize.rq.backend", "fais"), ("quantize.vq.metric", "cosine"),
    ("train.launcher", "mpirun"), ("train.device", "gpu"), ("examples.negatives", "sometimes"),
    ("encoder.image_tower", "resnet"), ("pairs.sources", "[swing, knn]"),
    ("train.arms", "[codes, codez]")])
def test_choice_fields_refuse_other_values_when_the_config_loads(key, bad):
    with pytest.raises(ConfigError, match=rf"{key}(\[\d\])? must be one of"):
        load_config(None, [f"{key}={bad}"])


@pytest.mark.parametrize("key, bad, says", [
    ("train.ranks", 0, "at least 1"), ("retrieval.ranks", -1, "at least 1"),
    ("train.threads_per_rank", 0, "at least 1"), ("retrieval.threads_per_rank", 0, "at least 1"),
    ("train.parallel_arms", -1, "0 .as many as the cores hold. or positive"),
    ("retrieval.parallel_towers", -2, "0 .as many as the cores hold. or positive")])
def test_process_counts_below_their_minimum_are_refused_when_the_config_loads(key, bad, says):
    with pytest.raises(ConfigError, match=f"{key} must be {says}, got {bad}"):
        load_config(None, [f"{key}={bad}"])


def test_each_package_owns_its_config_sections():
    import dataclasses

    from jobs.config import QarmConfig

    owners = {f.name: f.default_factory.__module__ for f in dataclasses.fields(QarmConfig)}
    assert owners["spark"] == owners["examples"] == "pipelines.config"
    assert owners["encoder"] == owners["align"] == "mm_encoder.config"
    assert owners["train"] == "recsys.config"
    # The orchestration's own sections: paths, MLflow and its registry's promotion gate, and
    # the daily job (which days continue which, refits, warm starts).
    assert {k for k, m in owners.items() if m == "jobs.config"} == {"paths", "mlflow",
                                                                    "registry", "daily"}
