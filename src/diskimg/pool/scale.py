"""libvirt's scaled integers (``virScaleInteger``), not qemu's size grammar: ``B``/``bytes``
= 1, ``KB`` = 1000, ``K``/``KiB`` = 1024, and so on up to ``E``/``EiB``/``EB``
(case-insensitive).  Invariant: no result exceeds its limit (``ULLONG_MAX`` by default);
every refusal is a :class:`PoolError` in libvirt's words.
"""

from __future__ import annotations

import re

from diskimg.errors import PoolError

ULLONG_MAX = (1 << 64) - 1
_SCALE_LETTERS = "kmgtpe"


def unit_scale(unit: str | None) -> int:
    """Multiplier of a libvirt unit suffix; raises :class:`PoolError` for an unknown one."""
    if unit is None or unit == "":
        return 1
    u = unit.lower()
    if u in ("b", "byte", "bytes"):
        return 1
    letter = u[0]
    rest = u[1:]
    if letter not in _SCALE_LETTERS:
        raise PoolError(f"invalid argument: unknown suffix '{unit}'")
    if rest in ("", "ib"):
        base = 1024
    elif rest == "b":
        base = 1000
    else:
        raise PoolError(f"invalid argument: unknown suffix '{unit}'")
    return int(base ** (_SCALE_LETTERS.index(letter) + 1))


def scale_integer(value: int, unit: str | None, limit: int = ULLONG_MAX) -> int:
    """``value`` times the unit's scale, refusing results above ``limit`` (libvirt's check)."""
    result = value * unit_scale(unit)
    if result > limit:
        raise PoolError(f"argument out of range: value too large: {value}{unit or ''}")
    return result


def parse_scaled(text: str, default_unit: str | None = None, limit: int = ULLONG_MAX) -> int:
    """Parse a scaled integer the way virsh does for sizes: ``1024``, ``10M``, ``1KB``, ``5GiB``.

    Digits (base 10) then an optional suffix.  Raises :class:`PoolError` with libvirt's
    wording (``unknown suffix 'X'``) for a bad suffix and ``malformed size`` for bad digits.
    """
    m = re.match(r"^\s*([0-9]+)(.*)$", text)
    if not m:
        raise PoolError(f"Malformed size {text}")
    digits, suffix = m.groups()
    return scale_integer(int(digits), suffix or default_unit, limit)


__all__ = ["ULLONG_MAX", "parse_scaled", "scale_integer", "unit_scale"]
