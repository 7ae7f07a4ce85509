"""Start conditions: guards a pending session must pass before it starts (``Session(start_conditions=[...])``).

A condition is a callable ``session -> bool``; one that returns False or raises
keeps the session pending, and its reason (the exception's message) is written
to the record's ``blocked_by`` (see :class:`ptutils.lifecycle.Admission`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .database import DBInterface, opened


def cuda_free(min_free_bytes: int = 0) -> Callable[[Any], bool]:
    """A start condition: a CUDA device with at least ``min_free_bytes`` free memory exists."""

    def cuda_free(_session: Any) -> bool:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is available")
        for index in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(index)
            if free >= min_free_bytes:
                return True
        raise RuntimeError(f"no CUDA device has {min_free_bytes} bytes free")

    return cuda_free


def db_reachable(db: DBInterface | str) -> Callable[[Any], bool]:
    """A start condition: the database (an interface or a URL) answers a ping (its error becomes the blocking reason)."""

    def db_reachable(_session: Any) -> bool:
        with opened(db) as interface:
            interface.ping()
        return True

    return db_reachable
