"""The ``diskimg`` process skips the interpreter's finalization only when it has nothing to
do (issue 20: cli/main.py ``_leave``).

A command's work is in the kernel once its images are closed, so the process may end at
once (``os._exit``) instead of finalizing every object.  What a user relies on, and what
these tests pin: the output on stdout and stderr and the exit code are whole either way;
and whatever the interpreter's exit would still do for them -- flush an image or a Python
file left open, run an atexit callback, wait for a thread -- is still done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import Qemu

import diskimg
from diskimg.cli.main import main

SRC = str(Path(diskimg.__file__).resolve().parents[1])
SCRIPT = str(Path(SRC).parent / "scripts" / "diskimg")
#: the interpreter without ``site`` (``-S``: no ``.pth`` file of this machine's own gets
#: to register an atexit callback or start a thread), finding diskimg and its
#: dependencies on the path this process has
QUIET = [sys.executable, "-S"]
QUIET_ENV = {"PYTHONPATH": os.pathsep.join([SRC, *(p for p in sys.path if p and os.path.isdir(p))])}

#: the real entry point (``run``) with the ``info`` command replaced by ``BODY``, which
#: leaves something for the interpreter's exit to do; argv: src dir, image, scratch file
LEAVES_WORK = """\
import sys
sys.path.insert(0, sys.argv[1])
from diskimg.cli import main as cli_main
from diskimg.cli.commands import info as info_cmd
import diskimg
image, scratch = sys.argv[2], sys.argv[3]
KEEP = []

def command(ctx, ns):
{body}
    return 0

info_cmd.run = command
sys.argv = ["diskimg", "info", image]
cli_main.run()
"""

BODIES = {
    # a buffered Python file, written and not closed: only its finalizer writes it out
    "unclosed file": """\
    f = open(scratch, "w")
    f.write("kept\\n")
    KEEP.append(f)""",
    # an atexit callback the command registered
    "atexit callback": """\
    import atexit
    atexit.register(lambda: open(scratch, "w").write("kept\\n"))""",
    # a thread still working when the command returns (not a daemon: the exit waits)
    "running thread": """\
    import threading, time
    def later():
        time.sleep(0.2)
        open(scratch, "w").write("kept\\n")
    threading.Thread(target=later).start()""",
    # an image left open, held by a module global (no cycle): closed when the modules are
    # torn down, which flushes it
    "open image": """\
    img = diskimg.open(image, "r+")
    img.write(0, b"kept\\n")
    open(scratch, "w").write("kept\\n")
    KEEP.append(img)""",
}


@pytest.mark.qemu
@pytest.mark.parametrize("case", sorted(BODIES))
def test_work_left_for_the_exit_is_still_done(case: str, tmp_path: Path, qemu: Qemu) -> None:
    image, scratch = tmp_path / "a.qcow2", tmp_path / "scratch"
    qemu.img("create", "-f", "qcow2", image, "1M")
    code = LEAVES_WORK.format(body=BODIES[case])
    r = subprocess.run([*QUIET, "-c", code, SRC, str(image), str(scratch)],
                       capture_output=True, text=True, timeout=60, check=False, env=QUIET_ENV)
    assert r.returncode == 0, r.stderr
    assert scratch.read_text() == "kept\n"
    qemu.check_clean(image)
    if case == "open image":
        assert qemu.raw_bytes(image, "qcow2")[:5] == b"kept\n"


#: an image opened before ``run()`` is frozen with start-up's objects, out of the
#: collector's list; the count of open images still sees it
OPENED_BEFORE_RUN = """\
import sys
sys.path.insert(0, sys.argv[1])
import diskimg
img = diskimg.open(sys.argv[2], "r+")
img.write(65536, b"\\x5a" * 65536)
from diskimg.cli import main as cli_main
sys.argv = ["diskimg", "info", sys.argv[3]]
cli_main.run()
"""


@pytest.mark.qemu
def test_an_image_opened_before_run_is_flushed_at_exit(tmp_path: Path, qemu: Qemu) -> None:
    image, other = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu.img("create", "-f", "qcow2", image, "1M")
    qemu.img("create", "-f", "qcow2", other, "1M")
    r = subprocess.run([*QUIET, "-c", OPENED_BEFORE_RUN, SRC, str(image), str(other)],
                       capture_output=True, text=True, timeout=60, check=False, env=QUIET_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"image: {other}\n")
    qemu.check_clean(image)
    assert qemu.raw_bytes(image, "qcow2")[65536:131072] == b"\x5a" * 65536


def _fragmented(path: Path) -> None:
    """A qcow2 whose map has a few thousand extents: every other 64 KiB cluster."""
    diskimg.create(path, "qcow2", 256 << 20)
    with diskimg.open(path, "r+") as img:
        for off in range(0, 256 << 20, 128 << 10):
            img.write(off, b"\x01" * 65536)


def test_the_process_output_and_exit_code_are_whole(tmp_path: Path) -> None:
    """More than a pipe's buffer of stdout, then the exit code of a failure with its
    message: the same as ``main()`` in this process gives."""
    path = tmp_path / "frag.qcow2"
    _fragmented(path)
    r = subprocess.run([*QUIET, SCRIPT, "map", "--output=json", str(path)],
                       capture_output=True, text=True, timeout=60, check=False, env=QUIET_ENV)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > 1 << 17
    entries = json.loads(r.stdout)
    assert len(entries) == 4096
    assert [(e["start"], e["data"]) for e in entries[:3]] == [(0, True), (65536, False),
                                                               (131072, True)]
    missing = tmp_path / "missing.qcow2"
    r = subprocess.run([*QUIET, SCRIPT, "info", str(missing)],
                       capture_output=True, text=True, timeout=60, check=False, env=QUIET_ENV)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (f"diskimg: Could not open '{missing}': Could not open '{missing}': "
                        "No such file or directory\n")
    assert main(["info", str(missing)]) == 1


#: after a command, what ``_leave`` asks; argv: src dir, command line
ASK = """\
import sys
sys.path.insert(0, sys.argv[1])
from diskimg.cli import main as cli_main
cli_main._PROCESS = True
rc = cli_main.main(sys.argv[2:])
print("rc", rc, "needed", cli_main._finalization_needed())
"""


@pytest.mark.parametrize("command", [["info"], ["check"], ["map", "--output=json"],
                                     ["convert", "-O", "raw"]])
def test_a_plain_command_leaves_nothing_to_finalize(command: list[str],
                                                    tmp_path: Path) -> None:
    """The common commands end without the interpreter's finalization (the start-up
    saving is real, not only possible): their images are closed, no thread, no callback."""
    path = tmp_path / "a.qcow2"
    _fragmented(path)
    argv = [*command, str(path)] + ([str(tmp_path / "out.raw")] if command[0] == "convert"
                                    else [])
    r = subprocess.run([*QUIET, "-c", ASK, SRC, *argv], capture_output=True, text=True,
                       timeout=60, check=False, env=QUIET_ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "rc 0 needed False"
