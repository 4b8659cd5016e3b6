"""Arrow list columns ↔ numpy matrices: written once, used by every reader of vectors and codes.

Tables hold vectors (embeddings, tower features) and codes as list columns of one length per
table (``fixed_size_list`` in the contract; plain ``list`` after a Spark round trip). Readers want
an (n, d) matrix.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_matrix(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """A list column of equal-length rows as an (n, d) array of ``dtype`` (d = 0 when empty).

    Raises ``ValueError`` when rows differ in length or a row is null."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array(
            [], column.type)
    n = len(column)
    if column.null_count:
        raise ValueError(f"{column.null_count} of {n} rows are null; expected a value per row")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if n == 0:
        width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else 0
        return np.zeros((0, width), dtype)
    if values.size % n:
        raise ValueError(f"{values.size} values do not split into {n} equal rows")
    out = values.reshape(n, -1)
    if not pa.types.is_fixed_size_list(column.type):
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != out.shape[1]).any():
            raise ValueError(f"rows have {lengths.min()} to {lengths.max()} values; expected "
                             "one length")
    out = np.ascontiguousarray(out, dtype=dtype)
    # Arrow hands out read-only views; callers (torch.from_numpy) expect an array they own.
    return out if out.flags.writeable else out.copy()


def matrix_column(matrix: np.ndarray, value_type: pa.DataType = pa.float32(),
                  fixed: bool = False) -> pa.Array:
    """An (n, d) array as a list column (``fixed_size_list`` when ``fixed``)."""
    matrix = np.ascontiguousarray(matrix)
    flat = pa.array(matrix.ravel(), value_type)
    fsl = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
    return fsl if fixed else fsl.cast(pa.list_(value_type))


def ids_and_matrix(table: pa.Table, column: str, dtype=np.float32,
                   key: str = "item_id") -> tuple[np.ndarray, np.ndarray]:
    """(ids ascending, matrix in that order) of ``table``'s ``key`` and list ``column``."""
    ids = table.column(key).to_numpy()
    mat = list_matrix(table.column(column), dtype)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.ascontiguousarray(mat[order])
