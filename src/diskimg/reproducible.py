"""Reproducible images: with ``SOURCE_DATE_EPOCH`` set (the reproducible-builds
convention), timestamps and identifiers diskimg invents are derived from it, so identical
inputs give byte-identical files.  Secrets (LUKS keys and salts) always stay random."""

from __future__ import annotations

import hashlib
import os
import random
import time


def source_date_epoch() -> int | None:
    """The ``SOURCE_DATE_EPOCH`` environment variable as seconds, or None when unset."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def now() -> float:
    """Seconds since the epoch: ``SOURCE_DATE_EPOCH`` when set, else the clock."""
    sde = source_date_epoch()
    return float(sde) if sde is not None else time.time()


def random_u32(*context: object) -> int:
    """A 32-bit identifier: random, or derived from ``SOURCE_DATE_EPOCH`` and ``context``
    (so different uses get different but repeatable values)."""
    sde = source_date_epoch()
    if sde is None:
        return random.getrandbits(32)
    digest = hashlib.sha256(repr((sde, *context)).encode()).digest()
    return int.from_bytes(digest[:4], "big")
