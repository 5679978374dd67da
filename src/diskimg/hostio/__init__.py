"""Host-file I/O: the only place diskimg calls ``os`` on image files."""

from diskimg.hostio.file import (
    HostFile,
    aligned_buffer,
    all_zero,
    open_host_file,
    path_name,
    zero_fill,
)

__all__ = ["HostFile", "aligned_buffer", "all_zero", "open_host_file", "path_name", "zero_fill"]
