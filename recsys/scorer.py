"""Scoring with a trained ranker outside training: a registered or assembled model (one CPU
module, ``recsys.runner.load_trained`` or ``recsys.saved.load_ranker``) scores examples rows,
building its batches from the model's own feature spec."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from recsys.data import to_batch


@torch.no_grad()
def score(model, rows: pa.Table, batch_size: int = 1024) -> np.ndarray:
    """Click probabilities for examples ``rows`` (the examples schema)."""
    model.eval()
    out = []
    for start in range(0, rows.num_rows, batch_size):
        part = rows.slice(start, batch_size)
        _, (_, logits, _) = model(to_batch(part, model.spec))
        out.append(torch.sigmoid(logits).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
