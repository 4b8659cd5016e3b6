"""Launching the ranks of a training job: local processes or ``torchrun``; a failing rank
stops the others and its log's tail becomes the error.

Local ranks are forked from a server process that has imported torch and TorchRec once
(``multiprocessing``'s forkserver with those modules preloaded): a fresh interpreter spends about
4 s of CPU importing them, and a DAG run launches a dozen ranks (six arms, then the retriever's
towers). The server never runs torch code, so no thread pool or CUDA context exists when it
forks; each rank sets its own thread count (``torch.set_num_threads``) and environment. CUDA
ranks are fresh interpreters still. As with any ``multiprocessing`` start method but ``fork``,
a forked rank imports the caller's main script first (as ``__mp_main__``): a script that calls
``launch`` keeps its work under ``if __name__ == "__main__":`` (``qarm`` and the benchmarks
do); an unguarded one fails the rank with multiprocessing's bootstrapping error in its log."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from recsys.job import TrainError, TrainJob

T = TypeVar("T")
R = TypeVar("R")

_PORTS_LOCK = threading.Lock()
_PORTS_ISSUED: set[int] = set()

#: What the rank server imports once, before it forks any rank.
RANK_PRELOAD = ("torch", "fbgemm_gpu", "torchrec", "torchrec.distributed.model_parallel",
                "torchrec.distributed.train_pipeline", "recsys.model", "recsys.sharding")
_SERVER_LOCK = threading.Lock()
_SERVER = None


def free_port() -> int:
    """A free local port that this process has not handed out before: runs launched at once
    from several threads each get their own rendezvous port (the OS may offer a port again as
    soon as the probing socket closes)."""
    with _PORTS_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS_ISSUED:
                _PORTS_ISSUED.add(port)
                return port


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's limit sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # not on Linux
        return os.cpu_count() or 1


def concurrent_runs(setting: int, ranks: int, threads: int, device: str = "cpu",
                    launcher: str = "local") -> int:
    """How many training runs (each ``ranks`` processes of ``threads`` torch threads) to launch
    at once: ``setting`` when positive; 0 = as many as the cores hold without oversubscribing
    them (at least 1). On ``cuda`` or under ``torchrun`` runs go one at a time (each rank owns
    a GPU; torchrun is launched per job)."""
    if setting < 0:
        raise ValueError(f"the number of concurrent runs must be 0 (auto) or positive, "
                         f"got {setting}")
    if setting:
        return setting
    if device == "cuda" or launcher == "torchrun":
        return 1
    return max(1, usable_cores() // max(1, ranks * threads))


def run_concurrently(fn: Callable[[T], R], items: Iterable[T], workers: int,
                     done: Callable[[], object] | None = None) -> list[R]:
    """``fn`` over ``items`` with at most ``workers`` at once (threads: each ``fn`` launches
    and waits on its own processes); the results in ``items``' order. ``done`` (a progress
    bar's update) is called after each run. The first failure cancels the runs not yet started
    and is raised once the runs in flight have ended."""
    items = list(items)
    if done is not None:
        inner = fn

        def fn(x):
            res = inner(x)
            done()
            return res
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(workers, len(items))) as ex:
        futures = [ex.submit(fn, x) for x in items]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in finished and f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0].exception()
        return [f.result() for f in futures]


def launch(job: TrainJob, ranks: int, launcher: str = "local", quiet: bool = False,
           module: str = "recsys.train", preloaded: bool = True) -> dict:
    """Run ``job`` on ``ranks`` local processes of ``python -m module --job job.json`` (the
    ranker's ranks, or the retriever's); returns ``result.json``. A failing rank stops the
    others and raises TrainError with its log's tail. ``preloaded``: fork CPU ranks from the
    rank server (``rank_server``); with False, on CUDA, and where the platform has no
    forkserver, each rank is a fresh interpreter."""
    if ranks < 1:
        raise TrainError(f"arm {job.arm}: ranks must be at least 1, got {ranks}")
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    job.save(job_path)
    (out / "result.json").unlink(missing_ok=True)
    port = free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(job.threads), "PYTHONUNBUFFERED": "1"}
    logs = [out / f"rank{r}.log" for r in range(ranks)]
    procs: list[subprocess.Popen] = []
    if launcher == "torchrun":
        log_f = open(logs[0], "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", module,
               "--job", str(job_path)]
        procs.append(subprocess.Popen(cmd, env=base, stdout=log_f, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs = logs[:1]
    elif launcher == "local":
        # CUDA ranks start fresh: each initialises its own device, and they run one job at a
        # time, so the imports are a small share of their time.
        ctx = rank_server() if preloaded and job.device == "cpu" else None
        for r in range(ranks):
            env = {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                   "LOCAL_WORLD_SIZE": str(ranks)}
            show = r == 0 and not quiet
            if ctx is not None:
                p = ctx.Process(target=_forked_rank, name=f"{job.arm}-rank{r}", args=(
                    module, str(job_path), env, None if show else str(logs[r])))
                p.start()
                procs.append(_Forked(p))
                continue
            f = None if show else open(logs[r], "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", module, "--job", str(job_path)], env=env,
                stdout=f, stderr=None if show else subprocess.STDOUT, start_new_session=True))
    else:
        raise ValueError(f"train.launcher must be local or torchrun, got {launcher!r}")
    try:
        failed = None
        while procs and failed is None:
            for i, p in enumerate(procs):
                rc = p.poll()
                if rc is not None and rc != 0:
                    failed = (i, rc)
                    break
            if all(p.poll() == 0 for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None and failed is not None:
                _killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    if failed is not None:
        i, rc = failed
        tail = ""
        path = logs[min(i, len(logs) - 1)]
        if path.exists():
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
        raise TrainError(f"rank {i} of arm {job.arm} exited with {rc}; log {path}:\n{tail}")
    result = out / "result.json"
    if not result.exists():
        raise TrainError(f"the ranks of arm {job.arm} exited without writing {result}; "
                         f"their logs are in {out}")
    return json.loads(result.read_text())


def rank_server():
    """The forkserver context whose server has imported ``RANK_PRELOAD`` (started on first
    use, one per process; None where the platform has no forkserver)."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            if "forkserver" not in multiprocessing.get_all_start_methods():
                return None
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(list(RANK_PRELOAD))
            _SERVER = ctx
        return _SERVER


def _forked_rank(module: str, job_path: str, env: dict, log_path: str | None) -> None:
    """A rank forked from the rank server: its own session (a failure elsewhere stops its
    whole process group, as for a subprocess), environment and log file, then the module's
    ``main``."""
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    # tqdm's default write lock is a multiprocessing RLock: a semaphore registered with the
    # resource tracker the rank shares with the launching process, which a rank leaving with
    # os._exit never unregisters ("leaked semaphore objects" when the launcher exits). A
    # rank is one process: a thread lock serves.
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    importlib.import_module(module).main(["--job", job_path])


class _Forked:
    """A forked rank behind ``subprocess.Popen``'s ``poll`` / ``wait`` / ``pid``."""

    def __init__(self, proc):
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
        return self.proc.exitcode


def _killpg(pid: int, sig: int) -> None:
    """Signal a rank's process group (the rank and whatever it started), or the rank alone
    when it has not made its group yet; gone already: fine."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def rank_main(argv, prog: str, description: str, load_job, run_rank) -> None:
    """The ``main`` of a rank module: read ``--job``, send log lines (ours and TorchRec's
    planner, gloo, fbgemm) to the rank's log file in the job's folder (the console of rank 0
    keeps the progress bar and any traceback), run the rank.

    A rank that finished its work leaves with ``os._exit(0)`` once its files and streams are
    flushed: under heavy CPU contention the interpreter's teardown of the process group's and
    fbgemm's native threads has aborted (SIGABRT) a rank whose results were already written."""
    import argparse
    import logging

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--job", required=True, help="path of job.json")
    job = load_job(ap.parse_args(argv).job)
    rank = os.environ.get("RANK", "0")
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(job.out_dir) / f"rank{rank}.log", mode="a")
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("recsys").setLevel(logging.INFO)
    # torch.fx warns on every trace that is_fx_tracing covers export too: console noise.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    run_rank(job)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
