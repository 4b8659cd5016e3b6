"""RQ: greedy residual k-means (QARM's semantic codes).

Level 1 runs k-means on the embeddings; each vector's nearest centroid is subtracted and level 2
runs k-means on the residuals, and so on for ``levels`` levels of ``codes`` centroids each.
Encoding is greedy: at each level, the nearest centroid of the current residual. There is no
learned encoder/decoder and no loss; codebooks are frozen once fitted, so new items are coded
without refitting.

``backend="faiss_rq"`` uses ``faiss.ResidualQuantizer`` configured for the same greedy scheme
(``Train_default``, beam size 1; its defaults are *not* greedy) and unpacks its bit-packed codes;
it needs ``codes`` to be a power of two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from quantizer.config import RQConfig, resolve_rq
from quantizer.kmeans import KMeansSettings, nearest, train_kmeans


def unpack_codes(packed: np.ndarray, levels: int, nbits: int) -> np.ndarray:
    """faiss' bit-packed codes (n, code_size) uint8, little-endian bit stream → (n, levels) int32.

    Only for ``nbits == 8`` is the packed array already (n, levels).
    """
    n = packed.shape[0]
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : levels * nbits]
    weights = (1 << np.arange(nbits, dtype=np.int64))
    return (bits.reshape(n, levels, nbits).astype(np.int64) @ weights).astype(np.int32)


@dataclass
class ResidualKMeans:
    cfg: RQConfig = field(default_factory=RQConfig)
    centroids: np.ndarray | None = None      # (levels, codes, d) float32
    fit_record: dict = field(default_factory=dict)

    def fit(self, x: np.ndarray) -> "ResidualKMeans":
        """Fit the codebooks on ``x`` (n, d) float32 (``codes: auto`` is sized from n)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.cfg = resolve_rq(self.cfg, x.shape[0])
        c = self.cfg
        if c.backend == "faiss_rq":
            return self._fit_faiss_rq(x)
        residual = x.copy()
        cents, records = [], []
        for level in range(c.levels):
            s = KMeansSettings(k=c.codes, niter=c.niter, seed=c.seed + level,
                               max_points_per_centroid=c.max_points_per_centroid,
                               backend=c.backend, balanced=c.balanced)
            cl, rec = train_kmeans(residual, s)
            idx = nearest(torch.from_numpy(residual), torch.from_numpy(cl))
            residual -= cl[idx.numpy()]
            cents.append(cl)
            records.append(rec)
        self.centroids = np.stack(cents).astype(np.float32)
        self.fit_record = {"method": f"greedy residual k-means, {c.backend} k-means per level",
                           "levels": records}
        return self

    def _fit_faiss_rq(self, x: np.ndarray) -> "ResidualKMeans":
        import faiss

        c = self.cfg
        nbits = int(np.log2(c.codes))
        if 2 ** nbits != c.codes:
            raise ValueError(f"faiss_rq needs a power-of-two number of codes, got {c.codes}")
        rq = faiss.ResidualQuantizer(x.shape[1], c.levels, nbits)
        rq.train_type = faiss.ResidualQuantizer.Train_default
        rq.max_beam_size = 1
        rq.cp.niter = c.niter
        rq.cp.seed = c.seed
        rq.cp.max_points_per_centroid = c.max_points_per_centroid
        rq.train(x)
        self.centroids = faiss.vector_to_array(rq.codebooks).reshape(
            c.levels, c.codes, x.shape[1]).astype(np.float32)
        self.fit_record = {"method": "faiss.ResidualQuantizer, Train_default, max_beam_size=1",
                           "niter": c.niter, "seed": c.seed,
                           "max_points_per_centroid": c.max_points_per_centroid}
        self._faiss = rq
        return self

    def encode(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Greedy codes (n, levels) int32: the nearest centroid of the residual at each level."""
        if self.centroids is None:
            raise RuntimeError("fit the codebooks (or load a codebook) before encoding")
        residual = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
        codes = np.empty((len(residual), len(self.centroids)), np.int32)
        for level, cl in enumerate(self.centroids):
            ct = torch.from_numpy(cl)
            idx = nearest(residual, ct, chunk=chunk)
            codes[:, level] = idx.numpy()
            residual -= ct[idx]
        return codes

    def decode(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """Sum of the chosen centroids of the first ``levels`` levels → (n, d)."""
        levels = codes.shape[1] if levels is None else levels
        out = np.zeros((len(codes), self.centroids.shape[2]), np.float32)
        for level in range(levels):
            out += self.centroids[level][codes[:, level]]
        return out

    def config_dict(self) -> dict:
        return asdict(self.cfg)
