"""qemu-img's global ``-T``/``--trace [[enable=]PATTERN][,events=FILE][,file=FILE]``.

diskimg has no trace events, so the option is accepted and does nothing, as it does in
qemu-img for a pattern that names no event: a plain event name gets qemu's warning that it
does not exist (a wildcard pattern matches nothing, silently), an ``events=`` file is read
line by line the same way, ``file=`` creates (truncates) the log file qemu would write.  A
malformed option, an unreadable events file or a log file that cannot be created are
qemu's errors.
"""

from __future__ import annotations

import sys

from diskimg.errors import UsageError
from diskimg.options import split_list

KEYS = ("enable", "events", "file")


def _pattern(prog: str, pattern: str, where: str = "") -> None:
    name = pattern[1:] if pattern.startswith("-") else pattern
    if "*" not in name and "?" not in name:
        sys.stderr.write(f"{prog}:{where} warning: trace event '{name}' does not exist\n")


def apply(prog: str, text: str) -> int:
    """Take one ``--trace`` argument: 0, or qemu's exit code after its message (a
    malformed option raises :class:`UsageError` with qemu's words)."""
    values: dict[str, str] = {}
    for i, item in enumerate(split_list(text)):
        if "=" in item:
            k, v = item.split("=", 1)
        elif i == 0:
            if not item:
                continue
            k, v = "enable", item
        else:
            k, v = (item[2:], "off") if item.startswith("no") else (item, "on")
        if k not in KEYS:
            raise UsageError(f"Invalid parameter '{k}'")
        values[k] = v
    if "enable" in values:
        _pattern(prog, values["enable"])
    if "events" in values:
        path = values["events"]
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError as e:  # qemu's own layout: no space after the program name
            sys.stderr.write(f"{prog}:{path}: {e.strerror}\n")
            return 1
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                _pattern(prog, line, f"{path}:{n}:")
    if "file" in values:
        try:
            with open(values["file"], "w"):
                pass
        except OSError as e:
            raise UsageError(f"Error opening logfile {values['file']}: {e.strerror}") from None
    return 0
