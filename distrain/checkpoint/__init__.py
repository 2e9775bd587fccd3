"""Sharded safetensors checkpoints: the format, saving, verifying, finding and loading them.

Layout of `<run>/checkpoints/step_<N:08d>/` (and `best/`):

    shard-<rank>.safetensors   what this rank writes: its pieces of the model state (`model.*`:
                               DTensor shards under FSDP2, its ZeRO partition under DeepSpeed;
                               replicated tensors are split between ranks so all ranks write),
                               the same for the optimizer state
                               (`optim.*`, keyed by parameter name)
    index.json                 tensor -> global shape, dtype and pieces (file, offset, shape);
                               optimizer param groups and scalar state
    trainer_state.json         step, epoch, samples consumed, scheduler, grad scaler, best metric,
                               early-stopping counters, world size, backend, recipe info, versions
    config.yaml                the run's config (so `distrain export` needs only the checkpoint)
    COMPLETE                   written last: step, and every other file's size and the xxh3-128
                               checksums of its eighths; a folder without it is never loaded

One file per step of a checkpoint's life: format.py (names, checksums, JSON), layout.py (what each
rank writes and the index's piece map), shard_file.py (one rank's file), save.py (write, commit,
retention), integrity.py (checksums and completeness), find.py (which checkpoint to resume), load.py
(read back into a live model and optimizer), manager.py (CheckpointManager: the Trainer's save and
resume, and the writer threads it owns), export.py (consolidated weights), resume_check.py (which
settings may change on resume). No pickle: tensors are safetensors, everything else JSON. This
module re-exports the names callers use.
"""

from distrain.checkpoint.find import choose, find_best, find_resumable, resolve, set_aside_future
from distrain.checkpoint.format import (
    ABANDONED,
    BLOCKS,
    CKPT_DIR,
    COMPLETE,
    CONFIG,
    INDEX,
    LATEST,
    STATE,
    TEXT_FILES,
    block_checksums,
    block_span,
    read_json,
    shard_name,
    step_dirs,
    step_name,
)
from distrain.checkpoint.integrity import HASH_WHILE_LOADING_ENV, hashed_while_loading, verify
from distrain.checkpoint.save import apply_retention, flush_pending, save_checkpoint
from distrain.errors import CheckpointError, ChecksumError

__all__ = [
    "ABANDONED", "BLOCKS", "CKPT_DIR", "COMPLETE", "CONFIG", "HASH_WHILE_LOADING_ENV", "INDEX", "LATEST", "STATE",
    "TEXT_FILES", "CheckpointError", "ChecksumError", "apply_retention", "block_checksums", "block_span", "choose",
    "find_best", "find_resumable", "flush_pending", "hashed_while_loading", "read_json", "resolve", "save_checkpoint",
    "set_aside_future", "shard_name", "step_dirs", "step_name", "verify",
]  # fmt: skip
