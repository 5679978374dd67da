"""The NBD protocol (Network Block Device), in pure Python.

- :mod:`diskimg.nbd.protocol`: the wire codec (constants, and a parse/pack pair for every
  record in both directions); no sockets.
- :mod:`diskimg.nbd.server`: a threaded NBD server over any :class:`diskimg.BlockDevice`
  (``diskimg nbd IMAGE``).

Nothing here is imported by ``import diskimg``: the package loads only when NBD is used.
"""

from __future__ import annotations
