"""The NBD wire codec: constants and one parse/pack pair per record, both directions.

Written from the NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md); no
sockets here.  Every parser takes the bytes of one record (``data``) and ``base``, the
offset of ``data[0]`` in the stream, and raises :class:`NbdProtocolError` naming the field
and its stream offset when the bytes are not what the spec allows.  Every length a peer
sends is bounded before anything is allocated for it.

The names are the spec's (``NBD_OPT_GO``, ``NBD_REP_ERR_UNSUP``, ...).  This module is
shared by the server and the client: names are only ever added, never renamed.
"""

from __future__ import annotations

from .handshake import *  # noqa: F403
from .handshake import __all__ as _handshake_all
from .transmission import *  # noqa: F403
from .transmission import __all__ as _transmission_all
from .wire import *  # noqa: F403
from .wire import __all__ as _wire_all

__all__ = [n for n in (*_wire_all, *_handshake_all, *_transmission_all)
           if not n.startswith("_")]
