"""Zero detection and sparse runs of a copy buffer (``-S``), by their old module: they
live in the package itself (:mod:`diskimg.ops`), so that a copy loads no module for them
(start-up, issue 20)."""

from diskimg.ops import (_FEW_ZERO_BYTES, _ZERO_RUN, _ZERO_SECTOR, _ZERO_WORD,
                         _allocated_sectors, _first_zero_head, _next_zero_sector,
                         _nonzero_at, is_zero, sparse_runs)

__all__ = ["_FEW_ZERO_BYTES", "_ZERO_RUN", "_ZERO_SECTOR", "_ZERO_WORD", "_allocated_sectors",
           "_first_zero_head", "_next_zero_sector", "_nonzero_at", "is_zero", "sparse_runs"]
