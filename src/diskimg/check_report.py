"""The format-neutral outcome of ``qemu-img check``: :class:`CheckReport` (qemu's
``ImageCheck``) and its qemu-img output.  Every format's ``check()`` returns one; it lives
below the formats so that no format imports another (vmdk used to import it from qcow2)."""

from __future__ import annotations

from diskimg import progname
from diskimg.slotted import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CheckReport"]


class CheckReport(Record):
    """Outcome of a format's ``check()`` (qcow2, vmdk); field names mirror qemu's ``ImageCheck``.

    ``messages`` holds what qemu-img writes to stderr (per-problem lines, ``Repairing ...``,
    and ``diskimg: ...`` error reports) in order; :meth:`summary_lines` what it writes to
    stdout in human mode.  ``error`` is set (strerror text) when the check could not
    complete: the CLI then prints ``Check failed: <error>`` and exits 1.
    """

    __slots__ = ("filename", "format", "check_errors", "corruptions", "leaks",
                 "corruptions_fixed", "leaks_fixed", "image_end_offset", "total_clusters",
                 "allocated_clusters", "fragmented_clusters", "compressed_clusters", "findings",
                 "messages", "error", "repair_messages", "repaired", "marked_corrupt",
                 "incomplete_snapshots", "snapshot_repairs", "snapshots_kept", "snapshots_size")
    filename: str
    format: str
    check_errors: int
    corruptions: int
    leaks: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int
    findings: list[dict[str, Any]]
    messages: list[str]
    error: str | None
    #: stderr lines of the repairing pass (before "The following inconsistencies...").
    repair_messages: list[str]
    repaired: bool
    #: a repair attempt hit inconsistent metadata and set the image's corrupt bit
    marked_corrupt: bool
    #: indexes of v3 snapshot table entries with less than 16 bytes of extra data
    incomplete_snapshots: list[int]
    #: snapshot table problems a rewrite of the table repairs (qemu counts each as a
    #: corruption): incomplete entries, cut extra data, dropped overhanging entries
    snapshot_repairs: int
    #: entries kept and bytes used by the snapshot table as the check read it
    snapshots_kept: int
    snapshots_size: int

    def __init__(self, filename: str, format: str = "qcow2", check_errors: int = 0,
                 corruptions: int = 0, leaks: int = 0, corruptions_fixed: int = 0,
                 leaks_fixed: int = 0, image_end_offset: int = 0, total_clusters: int = 0,
                 allocated_clusters: int = 0, fragmented_clusters: int = 0,
                 compressed_clusters: int = 0, findings: list[dict[str, Any]] | None = None,
                 messages: list[str] | None = None, error: str | None = None,
                 repair_messages: list[str] | None = None, repaired: bool = False,
                 marked_corrupt: bool = False, incomplete_snapshots: list[int] | None = None,
                 snapshot_repairs: int = 0, snapshots_kept: int = 0,
                 snapshots_size: int = 0) -> None:
        self.filename = filename
        self.format = format
        self.check_errors = check_errors
        self.corruptions = corruptions
        self.leaks = leaks
        self.corruptions_fixed = corruptions_fixed
        self.leaks_fixed = leaks_fixed
        self.image_end_offset = image_end_offset
        self.total_clusters = total_clusters
        self.allocated_clusters = allocated_clusters
        self.fragmented_clusters = fragmented_clusters
        self.compressed_clusters = compressed_clusters
        self.findings = [] if findings is None else findings
        self.messages = [] if messages is None else messages
        self.error = error
        self.repair_messages = [] if repair_messages is None else repair_messages
        self.repaired = repaired
        self.marked_corrupt = marked_corrupt
        self.incomplete_snapshots = [] if incomplete_snapshots is None else incomplete_snapshots
        self.snapshot_repairs = snapshot_repairs
        self.snapshots_kept = snapshots_kept
        self.snapshots_size = snapshots_size

    # --- output -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """qemu-img 7.2's JSON object (optional keys only when non-zero) plus ``findings``."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        opt = [("image-end-offset", self.image_end_offset), ("corruptions", self.corruptions),
               ("leaks", self.leaks), ("corruptions-fixed", self.corruptions_fixed),
               ("leaks-fixed", self.leaks_fixed), ("total-clusters", self.total_clusters),
               ("allocated-clusters", self.allocated_clusters),
               ("fragmented-clusters", self.fragmented_clusters),
               ("compressed-clusters", self.compressed_clusters)]
        for k, v in opt:
            if v:
                out[k] = v
        out["findings"] = self.findings
        return out

    def summary_lines(self) -> list[str]:
        """What qemu-img check prints on stdout in human mode (empty when it failed)."""
        out: list[str] = []
        if self.repaired:
            out += ["The following inconsistencies were found and repaired:", "",
                    f"    {self.leaks_fixed} leaked clusters",
                    f"    {self.corruptions_fixed} corruptions", "",
                    "Double checking the fixed image now..."]
        if self.error is not None:
            return out
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        else:
            if self.corruptions:
                out += ["", f"{self.corruptions} errors were found on the image.",
                        "Data may be corrupted, or further writes to the image may corrupt it."]
            if self.leaks:
                out += ["", f"{self.leaks} leaked clusters were found on the image.",
                        "This means waste of disk space, but no harm to data."]
            if self.check_errors:
                out += ["", f"{self.check_errors} internal errors have occurred during the "
                        "check."]
        if self.total_clusters and self.allocated_clusters:
            a, t = self.allocated_clusters, self.total_clusters
            out.append(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
                       f"{self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                       f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return out

    @property
    def failure_message(self) -> str | None:
        """The final error line qemu-img prints (without program name), if any."""
        if self.error is not None:
            return f"Check failed: {self.error}"
        if self.check_errors:
            return "Check failed"
        return None

    def human_lines(self) -> list[str]:
        """Everything ``qemu-img check`` prints, in logical order (stderr problem lines of
        the repairing pass, the repair block, the re-check's lines, the summary, and the
        ``diskimg: Check failed`` line when applicable)."""
        out = list(self.repair_messages) if self.repaired else []
        summary = self.summary_lines()
        if self.repaired:
            out += summary[:6]
            summary = summary[6:]
        out += self.messages
        out += summary
        if self.failure_message:
            out.append(f"{progname.name()}: {self.failure_message}")
        return out

    @property
    def exit_code(self) -> int:
        """0 clean (or fully repaired), 1 check failed, 2 corruptions, 3 only leaks."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0
