"""The qcow2 table codec and :class:`TableCache`, by their old module: they live in
:mod:`diskimg.qcow2.entries` with the entry codecs (one module for every table reader:
start-up, issue 20)."""

from diskimg.qcow2.entries import (
    _WORDS,
    HOST_LITTLE_ENDIAN,
    PURE_SWAP_BYTES,
    L2Table,
    TableCache,
    _swap,
    _swap_used,
    _swapped_array,
    be_table,
    be_u64_array,
    be_u64_table,
    l2_table_cache,
    new_lru,
    pack_be_table,
    pack_be_u64_array,
    swap_array,
    swap_pure,
    u64_copy,
    u64_run,
    u64_zeros,
)

__all__ = ["HOST_LITTLE_ENDIAN", "PURE_SWAP_BYTES", "L2Table", "TableCache", "_WORDS", "_swap",
           "_swap_used", "_swapped_array", "be_table", "be_u64_array", "be_u64_table",
           "l2_table_cache", "new_lru", "pack_be_table", "pack_be_u64_array", "swap_array",
           "swap_pure", "u64_copy", "u64_run", "u64_zeros"]
