"""Executing a qcow2 read plan: :func:`diskimg.qcow2.mapper.readinto` and its helpers,
by their old module (they live in the mapper, so that a read loads one module: start-up)."""

from diskimg.qcow2.mapper import plan, read_backing, readinto

__all__ = ["plan", "read_backing", "readinto"]
