"""Moved: the copy operations now live in the :mod:`diskimg.ops` package (one module per
job).  This module re-exports every name it used to define, so ``from diskimg.operations
import convert`` and tests that reach its internals keep working."""

from __future__ import annotations

from diskimg.hostio import HostFile, aligned_buffer
from diskimg.ops.chain import (_chain_layers, _commit_copy, _differing_sectors, _Layer,
    _open_data_file, _progress_steps, _read_or_zeros, _rebase_copy, commit, find_backing_image,
    rebase)
from diskimg.ops.common import _ZEROS, CHUNK, SECTOR, ProgressFn, Source, _open
from diskimg.ops.compare import _compare, _first_diff_sector, compare
from diskimg.ops.convert import _host_files, _pow2floor, _snapshot_view, convert
from diskimg.ops.copier import _COMBINE_BELOW, _Copier
from diskimg.ops.dd import dd
from diskimg.ops.readahead import (_BUFFERS, _ClusterDecoder, _ClusterKinds,
    _Concat, _Decoded, _kind_runs, _ReadAhead, _top_status)
from diskimg.ops.zero import (_ZERO_SECTOR, _ZERO_WORD, _allocated_sectors,
    _first_zero_head, _next_zero_sector, _nonzero_at, is_zero, sparse_runs)

__all__ = [
    "CHUNK",
    "SECTOR",
    "_BUFFERS",
    "_COMBINE_BELOW",
    "_ZEROS",
    "_ZERO_SECTOR",
    "_ZERO_WORD",
    "HostFile",
    "ProgressFn",
    "Source",
    "_ClusterDecoder",
    "_ClusterKinds",
    "_Concat",
    "_Copier",
    "_Decoded",
    "_Layer",
    "_ReadAhead",
    "_allocated_sectors",
    "_chain_layers",
    "_commit_copy",
    "_compare",
    "_differing_sectors",
    "_first_diff_sector",
    "_first_zero_head",
    "_host_files",
    "_kind_runs",
    "_next_zero_sector",
    "_nonzero_at",
    "_open",
    "_open_data_file",
    "_pow2floor",
    "_progress_steps",
    "_read_or_zeros",
    "_rebase_copy",
    "_snapshot_view",
    "_top_status",
    "aligned_buffer",
    "commit",
    "compare",
    "convert",
    "dd",
    "find_backing_image",
    "is_zero",
    "rebase",
    "sparse_runs",
]
