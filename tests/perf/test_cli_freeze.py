"""The ``diskimg`` process freezes what start-up made (issue 20: cli/main.py ``run``).

``run()`` moves the objects alive once the command's modules are loaded out of the cyclic
collector's reach (``gc.freeze``; the collector is off until then, and on again after),
so that the interpreter's collections (during the command and at exit) do not walk them
again.  What a user relies on, and what these tests
pin: an image the command opens is made after that point, so an image left unclosed in a
reference cycle is still finalized at exit, which flushes its tables; and a program that
runs the CLI in its own process through ``main()`` gets none of its objects frozen.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from qemukit import Qemu

import diskimg

SRC = str(Path(diskimg.__file__).resolve().parents[1])

#: the real entry point (``run``), with the ``info`` command replaced by one that writes
#: a cluster through the API and leaves the image open in a reference cycle
LEAKY_WRITER = """\
import gc, sys
sys.path.insert(0, sys.argv[1])
from diskimg.cli import main as cli_main
from diskimg.cli.commands import info as info_cmd
import diskimg

def leaky(ctx, ns):
    img = diskimg.open(sys.argv[2], "r+")
    img.write(65536, b"\\x5a" * 65536)
    img.cycle = img  # only the cyclic collector can finalize it
    print("frozen", gc.get_freeze_count() > 0, "tracked", gc.is_tracked(img),
          "enabled", gc.isenabled())
    return 0

info_cmd.run = leaky
sys.argv = ["diskimg", "info", sys.argv[2]]
cli_main.run()
"""


@pytest.mark.qemu
def test_an_image_left_open_in_a_cycle_is_still_flushed_at_exit(tmp_path: Path,
                                                                 qemu: Qemu) -> None:
    path = tmp_path / "leak.qcow2"
    qemu.img("create", "-f", "qcow2", path, "1M")
    r = subprocess.run([sys.executable, "-W", "default", "-c", LEAKY_WRITER, SRC, str(path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    # the freeze happened before the command, and the image (made later) is not frozen;
    # the collector, off while the modules load, runs again during the command
    assert r.stdout.split() == ["frozen", "True", "tracked", "True", "enabled", "True"]
    assert "unclosed image" in r.stderr  # finalized by the collection at exit
    qemu.check_clean(path)
    data = qemu.raw_bytes(path, "qcow2")
    assert data == bytes(65536) + b"\x5a" * 65536 + bytes((1 << 20) - 131072)


def test_main_in_a_callers_process_freezes_nothing(tmp_path: Path) -> None:
    """A program running ``main([...])`` keeps its collector as it was: nothing of its
    own is frozen (only the ``diskimg`` process, ``run()``, freezes)."""
    path = tmp_path / "a.qcow2"
    diskimg.create(path, "qcow2", 1 << 20)
    probe = ("import gc, sys; sys.path.insert(0, sys.argv[1]); "
             "from diskimg.cli.main import main; rc = main(['info', sys.argv[2]]); "
             "print('rc', rc, 'frozen', gc.get_freeze_count())")
    r = subprocess.run([sys.executable, "-c", probe, SRC, str(path)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "rc 0 frozen 0"
    assert r.stdout.splitlines()[0] == f"image: {path}"
