"""Rank-aware logging, configured once by the application (never at import time)."""

import logging

__all__ = ["setup_logging"]


class _RankFilter(logging.Filter):
    def __init__(self, rank, size):
        super().__init__()
        self.rank, self.size = rank, size

    def filter(self, record):
        record.rank = f"{self.rank}/{self.size}"
        return True


def setup_logging(comm=None, level=logging.INFO):
    """Send claire_py's log to stderr: rank 0 at ``level``, other ranks warnings only,
    prefixed with ``rank/size`` when there is more than one rank."""
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    logger = logging.getLogger("claire_py")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter(rank, size))
    prefix = "[%(rank)s] " if size > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))
    logger.propagate = False
    return logger
