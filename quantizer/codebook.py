"""Codebook artifacts: everything needed to assign codes later, saved once per version.

A codebook holds the RQ centroids per level, the VQ pool (item ids and vectors; the faiss index
is rebuilt from them), both configs, the fit record (k-means backend and sampling), the metrics
and the id of the embeddings snapshot it was fitted on. Its version is a content hash (or a name
the user gives); a version, once written, never changes: saving to an existing version raises
:class:`CodebookExists`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from quantizer.config import RQConfig, VQConfig
from quantizer.rq import ResidualKMeans
from quantizer.vq import NeighbourCodes


class CodebookExists(FileExistsError):
    """A codebook version is immutable and this one is already written."""


class CodebookNotFound(FileNotFoundError):
    """No codebook with that version under the artifact root."""


@dataclass
class Codebook:
    rq: ResidualKMeans
    vq: NeighbourCodes
    training_snapshot: str = ""
    metrics: dict = field(default_factory=dict)
    version: str = ""
    created_at: str = ""

    def content_version(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"rq": self.rq.config_dict(), "vq": self.vq.config_dict()},
                            sort_keys=True).encode())
        h.update(self.rq.centroids.tobytes())
        h.update(self.vq.pool_ids.tobytes())
        h.update(self.vq.pool_vectors.tobytes())
        return "cb-" + h.hexdigest()[:12]

    def encode(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(RQ codes (n, L) int32, VQ codes (n, K) int32) for items not seen at fit time too."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return self.rq.encode(vectors), self.vq.encode(ids, vectors)

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, centroids=self.rq.centroids, pool_ids=self.vq.pool_ids,
                 pool_vectors=self.vq.pool_vectors,
                 meta=np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Codebook":
        z = np.load(io.BytesIO(data))
        meta = json.loads(z["meta"].tobytes().decode())
        rq = ResidualKMeans(RQConfig(**meta["rq_config"]), z["centroids"], meta["fit_record"])
        vq = NeighbourCodes(VQConfig(**meta["vq_config"]), z["pool_ids"], z["pool_vectors"])
        return cls(rq, vq, meta["training_snapshot"], meta["metrics"], meta["version"],
                   meta["created_at"])

    def meta(self) -> dict:
        return {"version": self.version, "rq_config": self.rq.config_dict(),
                "vq_config": self.vq.config_dict(), "fit_record": self.rq.fit_record,
                "training_snapshot": self.training_snapshot, "metrics": self.metrics,
                "created_at": self.created_at, "dim": int(self.rq.centroids.shape[2]),
                "pool_size": int(len(self.vq.pool_ids))}

    # ------------------------------------------------------------------ files
    def save(self, root: str, version: Optional[str] = None) -> str:
        """Write to ``<root>/<version>/`` atomically; returns the folder. The version defaults to
        the content hash. Raises :class:`CodebookExists` if that version is already written."""
        self.version = version or self.version or self.content_version()
        self.created_at = self.created_at or dt.datetime.now(dt.timezone.utc).isoformat()
        folder = os.path.join(root, self.version)
        if os.path.exists(folder):
            raise CodebookExists(f"codebook {self.version} already exists at {folder}; versions "
                                 f"are immutable: choose another version")
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".{self.version}.tmp-{os.getpid()}")
        os.makedirs(tmp)
        try:
            with open(os.path.join(tmp, "codebook.npz"), "wb") as f:
                f.write(self.to_bytes())
            with open(os.path.join(tmp, "codebook.json"), "w") as f:
                json.dump(self.meta(), f, indent=2)
            os.chmod(os.path.join(tmp, "codebook.npz"), 0o444)
            os.chmod(os.path.join(tmp, "codebook.json"), 0o444)
            try:
                os.rename(tmp, folder)   # fails if another writer published this version first
            except OSError:
                raise CodebookExists(f"codebook {self.version} was written concurrently") from None
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        return folder

    @classmethod
    def load(cls, root: str, version: str) -> "Codebook":
        path = os.path.join(root, version, "codebook.npz")
        if not os.path.exists(path):
            have = sorted(v for v in os.listdir(root) if not v.startswith(".")) \
                if os.path.isdir(root) else []
            raise CodebookNotFound(f"no codebook {version} under {root}; available: "
                                   f"{', '.join(have) or 'none'}")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())
