"""``qarm``: run the daily DAG or one stage, and see what has run.

Examples::

    qarm run --config configs/demo.yaml                 # the whole DAG for today
    qarm run --config configs/movielens.yaml --until ingest
    qarm run --ds 2026-11-26 --only ingest --force       # one stage again
    qarm ingest --config configs/demo.yaml               # same as: run --only ingest
    qarm ablation --config configs/demo.yaml             # grid, 3 seeds, intervals
    qarm compare .qarm/ablation/A .qarm/ablation/B       # per arm: A - B, paired
    qarm run --config configs/daily.yaml --ds 2026-01-28  # one day of the daily job
    qarm backfill --config configs/daily.yaml --from 2026-01-27 --to 2026-01-29
    qarm status                                          # which stages of which run are done
    qarm report                                          # re-render the newest run report
    qarm promote --config configs/demo.yaml              # the promotion gate again
    qarm lineage qarm-ranker champion                    # what the champion was built from
    qarm recommend --config configs/demo.yaml --user u12 --k 10   # one user's top items
    qarm tag ../shared/data/coco128-train/images --top 3          # tag a folder of images
    qarm serve --config configs/demo.yaml --port 8000             # the HTTP service
    qarm ground frames/ "a red circle moves left"                 # where in a video
    qarm config --config configs/demo.yaml --set world.n_items=500   # the effective config
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jobs.config import ConfigError, QarmConfig, dump_yaml, load_config

log = logging.getLogger("qarm")

def _user_errors() -> tuple[type[BaseException], ...]:
    """Typed errors a user can act on: printed as one line, exit code 2, no traceback."""
    from feature_store.facts import FactsError
    from feature_store.schemas import SchemaMismatch
    from feature_store.snapshots import SnapshotNotFound
    from jobs.stage import DagError
    from mm_encoder.towers import ModelNotFound
    from pipelines.accounting import UnusableData
    from pipelines.examples import ExamplesError
    from pipelines.ingest_canonical import SchemaError
    from pipelines.sources import SourceError
    from pipelines.spark import SparkUnavailable
    from quantizer.codebook import CodebookExists, CodebookNotFound
    from jobs.registry import RegistryError
    from jobs.run_report import ReportError
    from quantizer.kmeans import TooFewPoints
    from recsys.features import FeatureSpecError
    from recsys.job import TrainError
    from jobs.recommend import RecommendError
    from jobs.tag import TagError
    from mm_encoder.tagger import TaggerError
    from recsys.index import FaissIndexError
    from recsys.retrieval import RetrievalError
    from recsys.saved import ModelFormatError
    from jobs.compare import CompareError
    from feature_store.online import OnlineStoreError
    from jobs.serve import ServeError
    from recsys.serving import VersionSkew
    from mm_encoder.gmu import GroundingError

    return (ConfigError, DagError, FactsError, SchemaError, SchemaMismatch, SnapshotNotFound,
            SourceError, SparkUnavailable, UnusableData, CodebookExists, CodebookNotFound,
            ModelNotFound, TooFewPoints, ExamplesError, FeatureSpecError, TrainError,
            ReportError, RegistryError, RecommendError, FaissIndexError, RetrievalError,
            ModelFormatError, TagError, TaggerError, CompareError, OnlineStoreError, ServeError,
            VersionSkew, GroundingError)


def _config_only(p: argparse.ArgumentParser) -> None:
    """--config, --set and -v: the options of the commands that run no stage."""
    p.add_argument("--config", "-c", metavar="FILE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML config (default: built-in defaults, the synthetic demo world)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set world.n_items=500 (repeatable)")
    p.add_argument("--ds", metavar="DATE", help="the run's date, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--force", action="store_true",
                   help="run stages even if their inputs and config are unchanged")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the DAG's and every stage's; the ranks' console "
                        "output goes to their log files): for schedulers and CI logs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    from jobs.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="qarm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="QARM-stack: trainable quantized multi-modal codes for recommendation.\n"
                    "Stages form one daily DAG; each reads and writes versioned snapshots under "
                    "<paths.root>/store\n(default ./.qarm) and logs to MLflow.",
        epilog=__doc__.split("Examples::", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the DAG (all stages, --until a stage, or --only one)",
                       description="Run the DAG's stages in order. A stage whose inputs and "
                                   "config are unchanged since its last success for this --ds, "
                                   "and whose outputs exist, is skipped.")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--until", metavar="STAGE", help="stop after this stage")
    g.add_argument("--only", metavar="STAGE", help="run just this stage (upstream must have run)")
    p.add_argument("--refit", action="store_true",
                   help="daily runs (daily.incremental): refit the encoder's alignment and the "
                        "codebook today whatever the drift, and retrain from scratch (same as "
                        "--set daily.refit=true)")

    p = sub.add_parser(
        "backfill", help="run the daily DAG for every day from --from to --to, in order",
        description="Run the DAG for each day from --from to --to (both included), in order, "
                    "each day continuing the previous one when daily.incremental is on. A day "
                    "that already ran with the same inputs and config is skipped stage by "
                    "stage, so rerunning a backfill (or one of its days) is idempotent. Stops "
                    "at the first day that fails.")
    _common(p)
    p.add_argument("--from", dest="first", metavar="DATE", required=True)
    p.add_argument("--to", dest="last", metavar="DATE", required=True)

    for s in STAGES:
        sp = sub.add_parser(s.name, help=s.help, description=f"{s.help}. Same as "
                            f"`qarm run --only {s.name}`.")
        _common(sp)
        if s.name == "ground":
            sp.description += (" With VIDEO and QUERY it runs no stage: it ranks the moments "
                               "of VIDEO (a folder of frame images in name order, or a .npy "
                               "of per-step features) that QUERY describes, with the GMU "
                               "model the stage trained (or --model); spans are shares of "
                               "the video, and frame indices.")
            sp.add_argument("video", nargs="?", metavar="VIDEO")
            sp.add_argument("query", nargs="?", metavar="QUERY")
            sp.add_argument("--top", type=int, default=5, help="moments to print (default 5)")
            sp.add_argument("--model", metavar="FOLDER", help="a saved GMU model folder")
            sp.add_argument("--json", action="store_true", help="as JSON")
        if s.name == "quantize":
            sp.add_argument("--assign-only", action="store_true",
                            help="do not fit: code the items with an existing codebook "
                                 "(needs --codebook)")
            sp.add_argument("--codebook", metavar="VERSION",
                            help="the codebook version to assign with (see <root>/artifacts/"
                                 "codebooks/); same as --set quantize.codebook=VERSION")

    p = sub.add_parser(
        "ablation", help="the ablation with seeds and intervals: a learning-rate grid on seed 0, "
                         "then every arm with ablation.seeds seeds, bootstrap intervals and "
                         "paired differences",
        description="Run the DAG up to `examples`, then train every arm of train.arms: once per "
                    "combination of ablation.grid on seed 0 (chosen by the validation metric; "
                    "the test part is never read to choose), then with seeds 1..ablation.seeds-1 "
                    "at the chosen settings; score the baselines; report seed-averaged test "
                    "metrics with 95% bootstrap intervals over users and paired differences. "
                    "Writes <root>/ablation/<ds>-<time>/ablation.json and logs to MLflow.")
    _common(p)
    p.add_argument("--no-grid", action="store_true",
                   help="skip the grid: train with the config's settings (train.tuned)")
    p.add_argument("--seeds", type=int, metavar="N", help="same as --set ablation.seeds=N")

    p = sub.add_parser(
        "compare", help="paired differences between two ablations of one split (e.g. two "
                        "image towers), per arm",
        description="Compare two `qarm ablation` outputs (folders <root>/ablation/<ds>-<time>/) "
                    "that scored the same test examples, for example the default config and "
                    "one with encoder.image_tower=tagger. For every arm in both: each side's "
                    "seed-averaged test AUC/GAUC and the paired difference A - B with a 95% "
                    "bootstrap interval over users (the same resamples for both sides), per "
                    "slice. Writes <A>/compare-<B>.json and .txt and logs to MLflow.")
    p.add_argument("a", metavar="A", help="an ablation folder (the change)")
    p.add_argument("b", metavar="B", help="an ablation folder (the reference)")
    p.add_argument("--label-a", default="", help="name of side A (default: its folder name)")
    p.add_argument("--label-b", default="", help="name of side B (default: its folder name)")
    _config_only(p)

    p = sub.add_parser(
        "report", help="rebuild a run's HTML report (the newest without --run), or build one "
                       "for --ds",
        description="Every `qarm run` writes <root>/reports/<run>/report.html (one self-contained "
                    "file: ablation table with intervals, curves, codebook plots, stage timings "
                    "and row counts, registered versions) and summary.json (the same figures). "
                    "--run ID re-renders a report from its summary.json; --ds DATE collects the "
                    "figures of that run date into a new report.")
    _config_only(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run", metavar="ID", help="a folder name under <root>/reports/")
    g.add_argument("--ds", metavar="DATE", help="build a new report for this run date")

    p = sub.add_parser(
        "lineage", help="a registered model version and everything it was built from",
        description="Print the chain from a registered version (qarm-ranker, qarm-codebook, "
                    "qarm-item-encoder) to the versions and snapshots it was built from. VERSION "
                    "may be a number or an alias (champion, challenger).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("version", metavar="VERSION")
    _config_only(p)

    p = sub.add_parser(
        "recommend", help="a user's recommendations with titles (registered retriever + ranker)",
        description="Print the top items for one user: the champion qarm-retriever (else the "
                    "one that wrote the newest candidates) ranks every item from the user's "
                    "positives, the champion qarm-ranker (else the newest of registry.arm) "
                    "re-ranks its top retrieval.rerank. USER is the id of the source data.")
    p.add_argument("--user", required=True, metavar="ID", help="the user's id in the source data")
    p.add_argument("--k", type=int, default=20, help="how many items (default 20)")
    _config_only(p)

    p = sub.add_parser(
        "serve", help="the recommendation service over the champion models and the online "
                      "store (POST /score, GET /recommend, /healthz, /metrics)",
        description="Serve the champion qarm-ranker (and qarm-retriever) over the online store "
                    "the publish stage wrote (online.backend: sqlite or redis). Refuses to "
                    "start when the store's codebook version is not the champion's. See the "
                    "README for example requests.")
    p.add_argument("--host", help="address to listen on (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    _config_only(p)

    p = sub.add_parser(
        "tag", help="tag a folder of images with the tagger the pretrain stage trained",
        description="Print the predicted tags of every image file in FOLDER (jpg, png, ...), "
                    "best first, with the registered qarm-tagger (champion, else newest), or "
                    "the one the newest item_pred_tags snapshot names.")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--top", type=int, default=5, help="tags per image (default 5)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="lowest probability shown (the best tag is always shown)")
    p.add_argument("--json", action="store_true", help="as JSON")
    _config_only(p)

    p = sub.add_parser(
        "dag", help="the stages, their engines and edges (what a scheduler needs)",
        description="Print the DAG for this config in run order: each stage, its engine (spark, "
                    "torch or python) and its upstream stages. jobs/airflow/qarm_daily.py builds "
                    "its Airflow tasks from the same graph.")
    _config_only(p)
    p.add_argument("--json", action="store_true", help="as JSON")

    p = sub.add_parser("status", help="which stages of which run are done, with their outputs")
    _config_only(p)
    p.add_argument("--ds", metavar="DATE", help="only this run date")

    p = sub.add_parser("config", help="print the effective configuration (after --set)")
    _config_only(p)
    return parser


#: Our packages: their INFO goes to the log file, their warnings also to the console.
OWN_LOGGERS = ("qarm", "jobs", "pipelines", "mm_encoder", "quantizer", "recsys", "feature_store")


def _own(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in OWN_LOGGERS


def setup_logging(cfg: QarmConfig | None, verbose: bool) -> None:
    """The console shows progress bars, reports and errors; everything else (our INFO lines,
    library warnings and chatter: MLflow, faiss, TorchRec, Python warnings) goes to
    ``<root>/logs/qarm.log``. ``-v`` puts our own DEBUG/INFO lines on the console too."""
    # MLflow installs its own console handler on import unless told not to.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    own_level = logging.DEBUG if verbose else logging.WARNING
    console.addFilter(lambda r: r.levelno >= (own_level if _own(r) else logging.ERROR))
    handlers: list[logging.Handler] = [console]
    if cfg is not None:
        logs = cfg.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(logs / "qarm.log")
        file.setFormatter(fmt)
        handlers.append(file)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        force=True)
    logging.captureWarnings(True)
    for noisy in ("py4j", "alembic", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torch.fx warns on every trace (TorchRec traces models) that is_fx_tracing covers export.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def print_outcomes(outcomes, store_root: Path) -> None:
    print()
    print(f"{'stage':<10} {'status':<8} {'seconds':>8}  outputs")
    for o in outcomes:
        outs = ", ".join(o.outputs.values())
        print(f"{o.stage:<10} {o.status:<8} {o.seconds:>8.1f}  {outs}")
    for o in outcomes:
        if o.report:
            note = " (unchanged: the report of its last run)" if o.status == "skipped" else ""
            print(f"\n[{o.stage}]{note}\n{o.report}")
    print(f"\nsnapshots: {store_root}/<table>/<snapshot_id>/ (manifest: _manifest.json)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "assign_only", False) and not args.codebook:
            raise ConfigError("--assign-only needs --codebook VERSION (an existing codebook)")
        if getattr(args, "codebook", None):
            args.overrides.append(f"quantize.codebook={args.codebook}")
        if getattr(args, "refit", False):
            args.overrides.append("daily.refit=true")
        if getattr(args, "seeds", None) is not None:
            args.overrides.append(f"ablation.seeds={args.seeds}")
        cfg = load_config(args.config, args.overrides)
        setup_logging(cfg, args.verbose)
        if args.command == "config":
            print(dump_yaml(cfg), end="")
            return 0
        if args.command == "dag":
            import json

            from jobs.dag import stage_graph
            from jobs.stages import STAGES

            g = stage_graph(STAGES, cfg)           # no store or state is touched
            if args.json:
                print(json.dumps(g, indent=1))
            else:
                for n in g:
                    after = ", ".join(n["upstream"]) or "-"
                    print(f"{n['stage']:<13} {n['engine']:<7} after {after}")
            return 0
        from jobs.dag import today
        from jobs.stages import build_dag

        dag = build_dag(cfg)
        if args.command == "status":
            rows = dag.status(args.ds)
            if not rows:
                print(f"no runs recorded under {cfg.root}")
                return 0
            print(f"{'ds':<11} {'stage':<10} {'status':<8} {'finished (UTC)':<20} outputs")
            import datetime as dt

            for r in rows:
                fin = dt.datetime.fromtimestamp(r["finished"], dt.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M:%S") if r["finished"] else "-"
                outs = ", ".join(r["outputs"].values()) or (r["error"] or "")
                print(f"{r['ds']:<11} {r['stage']:<10} {r['status']:<8} {fin:<20} {outs}")
            print(f"\nstore: {dag.store.root}")
            return 0
        if args.command == "lineage":
            from jobs.registry import Registry, RegistryError, format_lineage

            reg = Registry(cfg)
            version = args.version
            if not version.isdigit():
                v = reg.alias(args.model, version)
                if v is None:
                    raise RegistryError(f"{args.model} has no alias {version!r}")
                version = v.version
            print(format_lineage(reg.lineage(args.model, version)))
            return 0
        if args.command == "compare":
            from jobs.compare import (compare_ablations, format_compare, log_compare,
                                      write_compare)

            res = compare_ablations(args.a, args.b, label_a=args.label_a,
                                    label_b=args.label_b, bootstrap=cfg.ablation.bootstrap,
                                    level=cfg.ablation.level)
            path = write_compare(res)
            log_compare(cfg, res)
            print(f"{format_compare(res)}\n\n{path}")
            return 0
        if args.command == "serve":
            from jobs.serve import serve

            serve(cfg, args.host, args.port)
            return 0
        if args.command == "ground" and args.video is not None:
            if args.query is None:
                raise ConfigError('qarm ground VIDEO needs a QUERY: qarm ground VIDEO "a red '
                                  'circle moves left"')
            from jobs.ground_video import format_moments, ground_video

            print(format_moments(ground_video(cfg, args.video, args.query, args.top,
                                              args.model), args.json))
            return 0
        if args.command == "tag":
            from jobs.tag import format_rows, tag_folder

            print(format_rows(tag_folder(cfg, args.folder, args.top, args.threshold),
                              args.json))
            return 0
        if args.command == "recommend":
            from jobs.recommend import recommend

            print(recommend(cfg, args.user, args.k).text())
            return 0
        if args.command == "report":
            from jobs.run_report import build, rebuild

            path = build(cfg, dag, args.ds) if args.ds else rebuild(cfg, args.run)
            print(f"report: {path}")
            return 0
        if args.command == "backfill":
            from jobs.daily import days

            if args.ds:
                raise ConfigError("qarm backfill takes --from and --to, not --ds")
            try:
                todo = days(args.first, args.last)
            except ValueError as e:
                raise ConfigError(f"backfill: {e}") from None
            for i, day in enumerate(todo, 1):
                print(f"[backfill] day {i}/{len(todo)}: {day}", flush=True)
                outcomes = build_dag(cfg).run(day, force=args.force,
                                              progress=not args.no_progress)
                print_outcomes(outcomes, dag.store.root)
            return 0
        ds = args.ds or today()
        if args.command == "ablation":
            from jobs.ablation import run_ablation, tuned_yaml

            res = run_ablation(cfg, ds, grid=not args.no_grid, progress=not args.no_progress)
            print(f"\n[ablation] {res['wall_seconds']:.0f} s; {res['out_dir']}/ablation.json\n"
                  f"{res['table']}")
            if res["grid"]:
                print("\nchosen on the validation part (seed 0); to train with them:\n"
                      + tuned_yaml(res["chosen"]))
            return 0
        run = args.command == "run"
        outcomes = dag.run(ds, until=args.until if run else None,
                           only=args.only if run else args.command, force=args.force,
                           progress=not args.no_progress)
        print_outcomes(outcomes, dag.store.root)
        if dag.last_report is not None:
            print(f"report: {dag.last_report}")
        return 0
    except Exception as e:
        # Imported only now: the typed errors pull in TorchRec and the towers (~3 s).
        if not isinstance(e, _user_errors()):
            raise
        print(f"qarm: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
