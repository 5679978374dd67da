"""qemu's size grammar (``qemu_strtosz``) and its ``size_to_str`` rendering."""

from __future__ import annotations

from diskimg.errors import UsageError

INT64_MAX = (1 << 63) - 1
_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}
#: compiled on first use (re caches it), not when the module is imported
_SIZE_RE = r"^\s*\+?(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)([bBkKmMgGtTpPeE]?)$"
SIZE_HELP = ("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
             "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
SIZE_RANGE = f"Invalid image size specified. Must be between 0 and {INT64_MAX}."


def parse_size(text: str, default_suffix: str = "b") -> int:
    """Parse ``512``, ``1b``, ``64k``, ``1.5M``, ``0x10``... into bytes like qemu-img.

    A fraction needs a suffix other than ``b``; the result is truncated to whole bytes.
    Raises :class:`UsageError` with qemu-img's message.
    """
    import re  # only a command line with a size pays for it (start-up)

    m = re.match(_SIZE_RE, text)
    if not m:
        raise UsageError(SIZE_HELP, field="size")
    num, suffix = m.groups()
    suffix = (suffix or default_suffix).lower()
    mul = _SUFFIXES[suffix]
    if num.lower().startswith("0x"):
        value = int(num, 16) * mul
    elif "." in num:
        whole, frac = num.split(".")
        if mul == 1 and frac.strip("0"):
            # qemu: a fraction needs a suffix unless it is .0
            raise UsageError(SIZE_HELP, field="size")
        # exact rational arithmetic, then round to nearest like qemu's double maths
        value = int(whole or "0") * mul
        if frac:
            value += round(int(frac) * mul / 10 ** len(frac))
    else:
        value = int(num) * mul
    if value > INT64_MAX:
        raise UsageError(SIZE_RANGE)
    return value


def size_to_str(value: int) -> str:
    """Render bytes as qemu's ``size_to_str``: ``%0.3g`` with IEC suffixes, 1000+ rolls over."""
    suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    # math.frexp's exponent (the bit length of the integer part; math is a shared library
    # whose loading costs every info's start-up)
    exp = int(value / (1000.0 / 1024.0)).bit_length()
    i = max(0, (exp - 1) // 10)
    i = min(i, len(suffixes) - 1)
    return f"{value / (1 << (i * 10)):0.3g} {suffixes[i]}"
