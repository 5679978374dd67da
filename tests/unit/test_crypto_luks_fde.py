"""diskimg.crypto.luks.fde: the qcow2 full disk encryption header extension.
"""

from __future__ import annotations

import pytest

from diskimg.crypto.luks import (
    pack_fde_extension,
    parse_fde_extension,
)
from diskimg.errors import (
    FormatError,
)

# --- qcow2 FDE extension ----------------------------------------------------------------------

def test_fde_extension() -> None:
    data = pack_fde_extension(262144, 2068480)
    assert parse_fde_extension(data, 65536, 3 << 20) == (262144, 2068480)
    for bad, size in [(None, None), (b"\0" * 15, None),
                      (pack_fde_extension(0, 2068480), None),
                      (pack_fde_extension(1000, 2068480), None),
                      (pack_fde_extension(65536, 2**64 - 1), None),
                      (pack_fde_extension(65536, 100), None),
                      (pack_fde_extension(65536, 2068480), 1 << 20),
                      (pack_fde_extension(2**63, 4096), 1 << 20)]:
        with pytest.raises(FormatError):
            parse_fde_extension(bad, 65536, size)
