"""diskimg.pool.locking: the per-volume lock, QEMU's write lock and the refusal's words."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from diskimg.errors import ImageLockedError, PoolError
from diskimg.hostio import open_host_file
from diskimg.pool import locking


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def vol(tmp_path: Path) -> Path:
    p = tmp_path / "v.raw"
    p.write_bytes(bytes(range(256)) * 16)
    return p


def test_exclusive_lock_excludes_every_other_open(vol: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """OFD locks belong to the open file: a second open, even in this process, waits and
    then gives up with the volume's name; two shared locks coexist."""
    monkeypatch.setattr(locking, "LOCK_TIMEOUT", 0.1)
    a = os.open(vol, os.O_RDWR)
    b = os.open(vol, os.O_RDWR)
    try:
        locking.lock_volume_fd(a, True, "v.raw")
        for exclusive in (True, False):
            with pytest.raises(PoolError, match=r"volume 'v\.raw' is busy.*0\.1 s"):
                locking.lock_volume_fd(b, exclusive, "v.raw")
        os.close(a)
        a = os.open(vol, os.O_RDONLY)
        locking.lock_volume_fd(a, False, "v.raw")
        locking.lock_volume_fd(b, False, "v.raw")
    finally:
        os.close(a)
        os.close(b)


def test_op_lock_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PoolError, match=r"volume .fifo. is not a regular file"), \
            locking.op_lock(str(fifo), "fifo"):
        pass
    with pytest.raises(PoolError, match=r"Storage volume not found.*'gone'"), \
            locking.op_lock(str(tmp_path / "gone"), "gone"):
        pass


def test_op_lock_notices_a_name_replaced_while_it_waited(vol: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is re-checked after the wait: if another process replaced the file
    meanwhile, the caller gets "not found", not a lock on a file no longer in the pool."""
    holder = os.open(vol, os.O_RDWR)
    locking.lock_volume_fd(holder, True, "v.raw")
    result: list[BaseException | None] = []
    opened = threading.Event()
    real_lock = locking.lock_volume_fd

    def lock_after_signal(fd: int, exclusive: bool, name: str) -> None:
        opened.set()  # the waiter has the old file open and is about to wait for it
        real_lock(fd, exclusive, name)

    monkeypatch.setattr(locking, "lock_volume_fd", lock_after_signal)

    def waiter() -> None:
        try:
            with locking.op_lock(str(vol), "v.raw"):
                result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    assert opened.wait(10)
    other = tmp_path / "other"
    other.write_bytes(b"someone else's file")
    os.replace(other, vol)
    os.close(holder)  # releases the lock: the waiter proceeds and re-checks the name
    t.join(10)
    assert len(result) == 1 and isinstance(result[0], PoolError)
    assert "Storage volume not found" in str(result[0])
    assert vol.read_bytes() == b"someone else's file"


def test_unlink_if_same_never_removes_someone_elses_file(vol: Path, tmp_path: Path) -> None:
    fd = os.open(vol, os.O_RDONLY)
    try:
        other = tmp_path / "other"
        other.write_bytes(b"theirs")
        os.replace(other, vol)
        locking.unlink_if_same(fd, str(vol))
        assert vol.read_bytes() == b"theirs"
    finally:
        os.close(fd)
    fd = os.open(vol, os.O_RDONLY)
    try:
        locking.unlink_if_same(fd, str(vol))
        assert not vol.exists()
    finally:
        os.close(fd)


def test_in_use_names_the_volume_then_qemus_lines() -> None:
    e = ImageLockedError('Failed to get "write" lock\nIs another process using the image '
                         '[/p/v.raw]?')
    msg = str(locking.in_use(e, "/p/v.raw", "v.raw", "p"))
    assert msg.splitlines() == [
        "storage volume 'v.raw' in pool 'p' is in use by another process; force=True "
        "(virsh option --force) overrides",
        "Could not open '/p/v.raw': Failed to get \"write\" lock",
        "Is another process using the image [/p/v.raw]?",
    ]
    msg = str(locking.in_use(ImageLockedError("Could not open 'x': busy"), "x", "v", "p",
                             forcible=False))
    assert msg.splitlines() == ["storage volume 'v' in pool 'p' is in use by another process",
                                "Could not open 'x': busy"]


def test_qemu_locked_refuses_a_held_image_and_changes_nothing(vol: Path) -> None:
    before = digest(vol)
    with open_host_file(vol, True) as other:  # QEMU's write lock, held elsewhere
        with pytest.raises(ImageLockedError, match=r"storage volume .v\.raw. in pool .p. is "
                                                    "in use"), \
                locking.qemu_locked(str(vol), "v.raw", "p", force=False):
            pass
        with locking.qemu_locked(str(vol), "v.raw", "p", force=True) as host:
            assert host.pread(0, 4) == bytes(range(4))
        assert other.pread(0, 4) == bytes(range(4))
    assert digest(vol) == before
    with locking.qemu_locked(str(vol), "v.raw", "p", force=False) as host:
        host.pwrite(0, b"\xff")
    assert vol.read_bytes()[:2] == b"\xff\x01"
