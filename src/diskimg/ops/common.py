"""The names every copy operation shares, by their old module: they live in the package
itself (:mod:`diskimg.ops`), so that a command loads no module for them (start-up)."""

from diskimg.ops import (_ZEROS, CHUNK, SECTOR, ProgressFn, Source, _open, is_stream_path,
                         is_url_name)

__all__ = ["CHUNK", "SECTOR", "ProgressFn", "Source", "_ZEROS", "_open", "is_stream_path",
           "is_url_name"]
