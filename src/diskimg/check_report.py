"""The format-neutral outcome of ``qemu-img check``: :class:`CheckReport` (qemu's
``ImageCheck``) and its qemu-img output.  Every format's ``check()`` returns one; it lives
below the formats so that no format imports another (vmdk used to import it from qcow2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diskimg import progname

__all__ = ["CheckReport"]


@dataclass
class CheckReport:
    """Outcome of a format's ``check()`` (qcow2, vmdk); field names mirror qemu's ``ImageCheck``.

    ``messages`` holds what qemu-img writes to stderr (per-problem lines, ``Repairing ...``,
    and ``diskimg: ...`` error reports) in order; :meth:`summary_lines` what it writes to
    stdout in human mode.  ``error`` is set (strerror text) when the check could not
    complete: the CLI then prints ``Check failed: <error>`` and exits 1.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    #: stderr lines of the repairing pass (before "The following inconsistencies...").
    repair_messages: list[str] = field(default_factory=list)
    repaired: bool = False
    #: a repair attempt hit inconsistent metadata and set the image's corrupt bit
    marked_corrupt: bool = False
    #: indexes of v3 snapshot table entries with less than 16 bytes of extra data
    incomplete_snapshots: list[int] = field(default_factory=list)
    #: snapshot table problems a rewrite of the table repairs (qemu counts each as a
    #: corruption): incomplete entries, cut extra data, dropped overhanging entries
    snapshot_repairs: int = 0
    #: entries kept and bytes used by the snapshot table as the check read it
    snapshots_kept: int = 0
    snapshots_size: int = 0

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
