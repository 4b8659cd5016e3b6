"""MovieLens through the generic source with no other config (``make generic-check``): what a
user who brings their own files gets from the defaults.

Writes ``items.csv`` (title, genres as ``|``-separated tags, the poster's file name where
``../shared/data/ml-posters`` has one), ``events.csv`` (user, item, epoch-second timestamp,
rating) and a config that holds only the ``source`` section and a root, all under ``--out``;
the data sets are read in place and never copied into the repository. Then, unless
``--write-only``, runs ``qarm ablation`` on it (the DAG up to ``examples`` with the defaults:
``split.mode: auto``, ``quantize.rq.codes: auto``, early stopping; the grid on seed 0, then
3 seeds).

    .venv/bin/python checks/generic_movielens.py [--out /tmp/qarm-generic-movielens]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def write_inputs(out: Path, data: Path = DATA) -> Path:
    """The generic source's files for ml-latest-small and its config; returns the config."""
    import pandas as pd

    ml, posters = data / "ml-latest-small", data / "ml-posters"
    for need in (ml / "movies.csv", ml / "ratings.csv", posters):
        if not need.exists():
            raise SystemExit(f"{need} is missing: see ../shared/data/README.md")
    out.mkdir(parents=True, exist_ok=True)
    movies = pd.read_csv(ml / "movies.csv")
    have = {p.name for p in posters.glob("*.jpg")}
    image = [f"{i}.jpg" if f"{i}.jpg" in have else "" for i in movies.movieId]
    pd.DataFrame({"item_id": movies.movieId, "title": movies.title, "tags": movies.genres,
                  "image": image}).to_csv(out / "items.csv", index=False)
    ratings = pd.read_csv(ml / "ratings.csv")
    pd.DataFrame({"user_id": ratings.userId, "item_id": ratings.movieId, "ts": ratings.timestamp,
                  "rating": ratings.rating}).to_csv(out / "events.csv", index=False)
    cfg = out / "qarm.yaml"
    cfg.write_text(f"paths:\n  root: {out / 'qarm'}\nsource:\n  kind: generic\n"
                   f"  items: {out / 'items.csv'}\n  events: {out / 'events.csv'}\n"
                   f"  images_dir: {posters.resolve()}\n")
    print(f"{len(movies)} items ({sum(map(bool, image))} with a poster), {len(ratings)} events; "
          f"config {cfg}", file=sys.stderr)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/qarm-generic-movielens"))
    ap.add_argument("--write-only", action="store_true",
                    help="write the files and the config, run nothing")
    args = ap.parse_args()
    cfg = write_inputs(args.out)
    if not args.write_only:
        raise SystemExit(subprocess.call([str(REPO / ".venv" / "bin" / "qarm"), "ablation",
                                          "--config", str(cfg), "--no-progress"], cwd=REPO))


if __name__ == "__main__":
    main()
