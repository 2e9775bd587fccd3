"""Packing: documents concatenated into one token stream with an end-of-document token after each,
cut into fixed-length rows, and the document boundaries inside each row for the model.

A stream of N tokens gives (N - 1) // block rows of block + 1 tokens; row i starts at token
i * block, so consecutive rows share one token and every token after the first is a target
exactly once (inputs row[:-1], targets row[1:]). The end-of-document token closes its document:
the token after it starts the next one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

TOKEN_DTYPE = np.uint16  # token files hold uint16, as nanoGPT's: vocabularies up to 65,536


def write_documents(docs: Iterable[np.ndarray], eod: int, out: BinaryIO) -> list[int]:
    """Append each document's tokens and then `eod` to `out` (uint16), one document in memory at a
    time; returns each document's length in tokens, its end-of-document token included."""
    lengths = []
    for doc in docs:
        tokens = np.asarray(doc)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
            raise ValueError(f"token ids must lie in 0..{np.iinfo(TOKEN_DTYPE).max}")
        if (tokens == eod).any():
            raise ValueError(f"a document holds the end-of-document token {eod}")
        out.write(np.append(tokens, eod).astype(TOKEN_DTYPE).tobytes())
        lengths.append(len(tokens) + 1)
    return lengths


def num_rows(num_tokens: int, block: int) -> int:
    """Rows of block + 1 tokens (overlapping by one) that a stream of `num_tokens` tokens gives."""
    return max(num_tokens - 1, 0) // block


def rows(tokens: np.ndarray, indices: np.ndarray, block: int) -> np.ndarray:
    """Rows `indices` of the stream, shape [len(indices), block + 1]: one gather, which on a
    memory-mapped file reads only those rows' pages."""
    starts = np.asarray(indices, dtype=np.int64) * block
    return np.asarray(tokens[starts[:, None] + np.arange(block + 1)])


def segments(x: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """For input rows `x` [B, T]: (doc, pos), each [B, T] int64. doc[b, t] numbers the documents
    within the row (0 for the one the row starts in), pos[b, t] is the position since that
    document's start in the row (restarting at 0 after each end-of-document token). Attention
    that stays within a document is `doc[:, :, None] == doc[:, None, :]` (with the causal mask)."""
    x = np.asarray(x)
    b, t = x.shape
    starts = np.zeros((b, t), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = x[:, :-1] == eod
    doc = np.cumsum(starts, axis=1, dtype=np.int64) - 1
    steps = np.arange(t, dtype=np.int64)
    first = np.maximum.accumulate(np.where(starts, steps, 0), axis=1)
    return doc, steps - first
