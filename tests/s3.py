"""A real S3-compatible server for the tests: moto in server mode on a free loopback port.

It runs as its own process with its access log in a file (werkzeug writes one line per HTTP
request), so a test can count the requests a piece of code makes against it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

#: Dummy credentials: moto accepts any; pyarrow needs some to sign requests.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d+)')
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours error and partial-content lines


class MotoServerFailed(RuntimeError):
    """moto_server did not start or answer."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server`` on 127.0.0.1:<free port>; its access log is ``log_path``."""

    def __init__(self, log_path: Path):
        self.log_path, self.port = log_path, _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, bucket: str, prefix: str) -> str:
        """A ``pyarrow.fs`` URI of ``s3://bucket/prefix`` on this server."""
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def start(self, timeout_s: float = 60.0) -> "MotoServer":
        script = shutil.which("moto_server", path=os.path.dirname(sys.executable))
        cmd = [script] if script else [sys.executable, "-m", "moto.server"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # each log line as soon as it happens
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MotoServerFailed(f"moto_server exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise MotoServerFailed(f"moto_server did not answer on {self.endpoint} in {timeout_s} s")

    def create_bucket(self, bucket: str) -> None:
        fs = pafs.S3FileSystem(access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
                               secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                               region=S3_ENV["AWS_DEFAULT_REGION"], endpoint_override=self.endpoint,
                               scheme="http", allow_bucket_creation=True)
        fs.create_dir(bucket)

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request served so far, in order."""
        return [(m.group(1), m.group(2), int(m.group(3)))
                for m in _REQUEST.finditer(_COLOUR.sub("", self.log_path.read_text()))]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
