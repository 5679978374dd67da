"""Host-file I/O: the only place diskimg calls ``os`` on image files."""

from diskimg.hostio.file import HostFile, aligned_buffer, all_zero, open_host_file, zero_fill

__all__ = ["HostFile", "aligned_buffer", "all_zero", "open_host_file", "zero_fill"]
