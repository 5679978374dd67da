"""The qcow2 check's internal abort signals; its result type is the format-neutral
:class:`diskimg.check_report.CheckReport` (``CheckResult`` is kept as an alias)."""

from __future__ import annotations

from diskimg.check_report import CheckReport

_STRERROR = {
    "EIO": "Input/output error",
    "EFBIG": "File too large",
    "EINVAL": "Invalid argument",
    "ENOMEM": "Cannot allocate memory",
}


class _Abort(Exception):
    """The check could not complete (qemu: the check function returned < 0)."""

    def __init__(self, errno_name: str) -> None:
        super().__init__(errno_name)
        self.strerror = _STRERROR.get(errno_name, errno_name)


class _RefErr(Exception):
    """A stored refcount could not be read (unaligned refcount block)."""


#: the qcow2 check's historical name for :class:`diskimg.check_report.CheckReport`
CheckResult = CheckReport


def _counts(res: CheckResult) -> tuple[int, int, int, int, int]:
    return (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed,
            res.leaks_fixed)


def _set_counts(res: CheckResult, c: tuple[int, int, int, int, int]) -> None:
    (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed,
     res.leaks_fixed) = c
