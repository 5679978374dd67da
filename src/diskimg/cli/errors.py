"""The one place that words errors as qemu-img does.

The library raises structured errors (:class:`diskimg.DiskImgError` with ``path``,
``operation``, ``reason``, ``field`` and ``notes``); the commands raise the CLI's own
:class:`ExitCode` and :class:`CommandLineError`.  This module turns both into the text
qemu-img 7.2 prints on stderr:

- :func:`render` — the whole stderr text of an error that ends a command (program prefix
  on the first line and on each note, "Try ... --help" after a command-line mistake);
- :func:`open_reason` / :func:`open_failure` — ``Could not open 'NAME': reason``;
- :func:`chain_open_failure` — ``info --backing-chain``'s wording for a backing file;
- :func:`create_reason` — why a new file could not be created;
- :func:`action_failure` — ``Could not <action>: reason`` (snapshots, backing files).

No function here looks inside message text: every decision is made on classes and fields.
"""

from __future__ import annotations

from diskimg import progname
from diskimg.errors import (BackingChainError, DiskImgError, FormatError, ImageLockedError,
                            UsageError, WrongFormatError)

def prog() -> str:
    """The program name of the messages (argv[0]'s basename: :mod:`diskimg.progname`)."""
    return progname.name()


def try_help() -> str:
    return f"Try '{prog()} --help' for more information"

#: the ``operation`` of an error about a backing file that could not be found or read
OPEN_BACKING = "open backing file"
#: the ``operation`` of api's error for a file met twice in one backing chain
FOLLOW_CHAIN = "follow backing chain"


class ExitCode(Exception):
    """An error that ends a command with a specific exit code.

    ``notes``: further lines, each printed with the program prefix; ``newline``: False when
    qemu-img ends the text without one (its "Detected format of ..." hint)."""

    def __init__(self, message: str, code: int, *, notes: tuple[str, ...] = (),
                 newline: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.notes = notes
        self.newline = newline


class CommandLineError(UsageError):
    """A mistake on the command line: qemu-img follows it with "Try ... --help"."""


def _prefixed(first: str, notes: tuple[str, ...] = (), *, every_line: bool = False,
              newline: bool = True) -> str:
    lines = first.split("\n")
    name = prog()
    out = [f"{name}: {line}" if i == 0 or every_line else line for i, line in enumerate(lines)]
    out += [f"{name}: {note}" for note in notes]
    return "\n".join(out) + ("\n" if newline else "")


def os_message(e: OSError) -> str:
    """qemu's words for a host error: ``Could not open 'FILE': strerror``."""
    if e.filename is not None and e.strerror:
        return f"Could not open '{e.filename}': {e.strerror}"
    return e.strerror or str(e)


def render(e: BaseException) -> tuple[str, int]:
    """The stderr text and exit code for an error that ends a command."""
    if isinstance(e, ExitCode):
        return _prefixed(str(e), e.notes, newline=e.newline), e.code
    if isinstance(e, CommandLineError):
        return _prefixed(f"{e}\n{try_help()}", e.notes), 1
    if isinstance(e, DiskImgError):
        # qemu prints a size error as two error_report calls: each line has the prefix
        return _prefixed(str(e), e.notes, every_line=e.field == "size"), 1
    if isinstance(e, OSError):
        return _prefixed(os_message(e)), 1
    if isinstance(e, KeyboardInterrupt):
        return _prefixed("interrupted"), 130
    return _prefixed(f"internal error: {type(e).__name__}: {e}"), 1


def usage_text(message: str) -> str:
    """A command-line mistake found before any command ran (the parser's own)."""
    return _prefixed(f"{message}\n{try_help()}")


def open_reason(e: DiskImgError, fmt: str | None) -> str:
    """Why an image would not open, as qemu words it: a backing file that is missing or
    unreadable is named on its own, and a file that is not a vmdk, opened with
    ``-f vmdk``, has an "invalid VMDK image descriptor"."""
    if isinstance(e, BackingChainError) and e.operation == OPEN_BACKING and e.reason:
        return f"Could not open backing file: Could not open '{e.path}': {e.reason}"
    if fmt == "vmdk" and isinstance(e, WrongFormatError) and e.field == "format":
        return "invalid VMDK image descriptor"
    return str(e)


def open_failure(label: str, e: BaseException, fmt: str | None) -> DiskImgError:
    """``Could not open 'LABEL': reason`` for an image (or option string) that would not
    open; the error keeps its class, offset and fields, and records ``label``."""
    if isinstance(e, DiskImgError):
        err = type(e)(f"Could not open '{label}': {open_reason(e, fmt)}")
        if isinstance(e, FormatError) and isinstance(err, FormatError):
            err.offset = e.offset  # which byte of the image was at fault
        err.backing_path, err.backing_reason = e.backing_path, e.backing_reason
        err.path, err.operation, err.reason = label, "open", str(e)
        return err
    if isinstance(e, OSError):
        return DiskImgError(f"Could not open '{label}': {e.strerror or e}", path=label,
                            operation="open", reason=e.strerror or str(e))
    raise TypeError(e)


def chain_open_failure(e: DiskImgError, name: str = "",
                       same: bool = False) -> DiskImgError | None:
    """``info --backing-chain`` opens image after image, so a backing file that would not
    open is reported under its own name: ``Could not open 'B': Could not open 'B': ...``
    (qemu names it twice), and a file met twice ``creates an infinite loop`` (under
    ``name``, the image's name as given, when ``same``: the loop comes back to it).  None
    when ``e`` is not about a backing file."""
    inner = e.__cause__ if isinstance(e.__cause__, DiskImgError) else e
    if isinstance(inner, BackingChainError) and inner.operation == FOLLOW_CHAIN:
        looped = name if same else inner.path
        return DiskImgError(f"Backing file '{looped}' creates an infinite loop.",
                            path=looped, operation=FOLLOW_CHAIN)
    if inner.backing_path is not None:  # the backing file itself would not open
        return DiskImgError(f"Could not open '{inner.backing_path}': {inner.backing_reason}",
                            path=inner.backing_path, operation="open")
    if isinstance(inner, BackingChainError) and inner.operation == OPEN_BACKING and \
            inner.reason:
        return DiskImgError(f"Could not open '{inner.path}': Could not open '{inner.path}': "
                            f"{inner.reason}", path=inner.path, operation="open")
    return None


def create_reason(e: BaseException, path: str, *, exact: bool = False) -> str:
    """The reason the new file ``path`` could not be created, worded like qemu's: a host
    file that would not open reads "Could not create" (with ``exact``: only ``path``
    itself, not another file the creation opened)."""
    if isinstance(e, ImageLockedError):
        return str(e)  # qemu's two lines as they are (it is an OSError too)
    if isinstance(e, OSError):
        return f"Could not create '{path}': {e.strerror or e}"
    if isinstance(e, DiskImgError) and e.operation == "open" and e.path is not None and \
            e.reason is not None and (e.path == path or not exact):
        return f"Could not create '{e.path}': {e.reason}"
    return str(e)


def backing_open_reason(e: DiskImgError, path: str, name: str) -> str:
    """Why the backing file ``name`` (found at ``path``) would not open: under the name
    the user gave when the file itself would not open."""
    if e.operation == "open" and e.path == path and e.reason is not None:
        return f"Could not open '{name}': {e.reason}"
    return str(e)


def action_failure(action: str, e: DiskImgError) -> DiskImgError:
    """``Could not ACTION: reason`` (``create snapshot 'x'``, ``apply snapshot 'x'``...)."""
    return DiskImgError(f"Could not {action}: {e}", operation=action, reason=str(e))


def with_notes(e: DiskImgError, *notes: str) -> DiskImgError:
    """``e`` with further lines printed after it, each with the program prefix."""
    e.notes = (*e.notes, *notes)
    return e


_LOAD_SNAPSHOT = "Failed to load snapshot: "


def snapshot_load_failure(e: DiskImgError) -> DiskImgError:
    """``Failed to load snapshot: reason`` (measure -l).  Errors raised while loading a
    snapshot already say so and carry ``operation="load snapshot"``; any other error gets
    the prefix."""
    msg = str(e)
    if e.operation != "load snapshot":
        msg = _LOAD_SNAPSHOT + msg
    return DiskImgError(msg, operation="load snapshot", reason=str(e))


def exit_code(e: DiskImgError | OSError, code: int) -> ExitCode:
    """``e`` ending the command with exit code ``code`` (compare's 2 for an error)."""
    if isinstance(e, DiskImgError):
        return ExitCode(str(e), code, notes=e.notes)
    return ExitCode(e.strerror or str(e), code)
