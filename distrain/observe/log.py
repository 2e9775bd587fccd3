"""Logging: console and train.log, with the rank in every line and the progress bar left intact.

Only rank 0 writes files and shows the bar; other ranks log warnings and errors to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(message)s"



class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)



@contextlib.contextmanager
def held_records() -> Iterator[list[logging.LogRecord]]:
    """Keep what distrain logs before the run dir may be written to (the resume decides that), for
    setup_logging to put into train.log; warnings still reach stderr at once."""
    logger = logging.getLogger("distrain")
    records: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            if record.levelno >= logging.WARNING:
                print(f"{record.levelname} {record.getMessage()}", file=sys.stderr)

    handler, level = Hold(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)



def setup_logging(rank: int, run_dir: Path | None, earlier: list[logging.LogRecord] = ()) -> logging.Logger:
    """Console (rank 0; warnings from every rank) and train.log (rank 0), which starts with `earlier`."""
    logger = logging.getLogger("distrain")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    old_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(factory)
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    logger.addHandler(console)
    if run_dir is not None and rank == 0:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        for record in earlier:
            record.rank = rank
            file_handler.handle(record)
        logger.addHandler(file_handler)
    return logger
