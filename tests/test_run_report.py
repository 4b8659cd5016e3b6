"""The run report's page from a summary: numbers, images, no network, rebuild by run id."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main
from jobs.report_html import render
from tests.report_checks import check_report


def summary(run="2026-01-31T120000000"):
    arms = ["codes", "frozen_aligned", "popularity"]
    test = [{"arm": a, "slice": sl, "n": 100, "seeds": 3, "auc": 0.7 + i / 100 + j / 1000,
             "auc_lo": 0.65, "auc_hi": 0.75, "gauc": 0.61, "gauc_lo": 0.5, "gauc_hi": 0.7,
             "logloss": 0.4, "ne": 0.98765, "cal_ne": None, "ne_train": 0.99}
            for i, a in enumerate(arms) for j, sl in enumerate(["all", "cold"])]
    return {
        "run": run, "ds": "2026-01-31", "created_at": "2026-01-31T12:00:00+00:00",
        "source": "synthetic", "root": "/tmp/q",
        "stages": [{"stage": "ingest", "status": "done", "error": None, "seconds": 3.5,
                    "started": "x", "inputs": {"raw_events": 1000},
                    "outputs": {"events": 990}, "quarantined": {"quarantine": 10}}],
        "ablation": {"arms": arms, "level": 0.95, "bootstrap": 1000, "test": test,
                     "pairs": [{"a": "codes", "b": "frozen_aligned", "slice": "cold",
                                "metric": "auc", "diff": -0.0123, "lo": -0.03, "hi": 0.004}],
                     "valid": []},
        "training": {"codes": {"loss": [[1, 0.7], [2, 0.5], [3, 0.45]],
                               "valid": [[2, 0.6], [3, 0.65]], "valid_metric": "auc",
                               "steps": 3, "best_step": 3, "world": 2}},
        "codebooks": [{"stage": "quantize", "table": "item_codes",
                       "levels": [{"level": 1, "utilization": 1.0, "perplexity": 30.0},
                                  {"level": 2, "utilization": 0.9, "perplexity": 20.0}],
                       "prefixes": [{"prefix": 1, "collision_rate": 0.9,
                                     "items_per_code_max": 80},
                                    {"prefix": 2, "collision_rate": 0.2,
                                     "items_per_code_max": 4}]}],
        "retrieval": {"popularity": [[10, 0.05], [50, 0.2]], "sasrec_codes": [[10, 0.1],
                                                                            [50, 0.3]]},
        "registered": [{"stage": "train", "model": "qarm-ranker", "version": "3",
                        "tags": {"arm": "codes", "codebook_version": "cb-1"}}],
    }


def test_every_number_of_the_ablation_tables_is_the_summarys_and_images_are_inline():
    s = summary()
    counts = check_report(render(s), s)
    assert counts == {"test": 6 * 6, "pair": 3, "images": 4}


def test_a_wrong_number_or_a_network_image_fails_the_check():
    s = summary()
    page = render(s)
    with pytest.raises(AssertionError):
        check_report(page.replace(">0.7010<", ">0.7011<"), s)
    with pytest.raises(AssertionError):
        check_report(page.replace('<img src="data:image/png;base64,',
                                  '<img src="https://cdn.example.com/x.png" data-x="', 1), s)


def test_qarm_report_rebuilds_a_run_from_its_summary_and_names_unknown_runs(tmp_path, capsys):
    s = summary()
    folder = tmp_path / "reports" / s["run"]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(s))
    args = ["--set", f"paths.root={tmp_path}", "--set", "mlflow.enabled=false"]
    assert main(["report", *args, "--run", s["run"]]) == 0
    assert f"report: {folder / 'report.html'}" in capsys.readouterr().out
    check_report((folder / "report.html").read_text(), s)
    assert main(["report", *args]) == 0                       # the newest run
    assert main(["report", *args, "--run", "nope"]) == 2
    assert "no report 'nope'" in capsys.readouterr().err
