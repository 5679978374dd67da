"""``virsh vol-wipe``: the algorithms (scrub's pass lists) and how a volume file is
overwritten, then re-created in its format.

Invariants: every refusal (unknown algorithm, a format diskimg cannot re-create, an
encrypted volume, a vmdk whose backing file cannot be read, an image that keeps guest data
in other files too) happens before the first byte is overwritten; a pass covers the whole
host file [0, size) and is fsynced; a verified pass reads every byte back; the new image is
made while the wipe's descriptor still holds QEMU's write lock (or its override), so no
other process opens the volume between the two.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from diskimg.errors import PoolError
from diskimg.hostio import HostFile
from diskimg.pool.create import CHUNK, CREATE_FORMATS, check_can_create, qcow2_options
from diskimg.pool.xml import VolumeDef

#: virsh vol-wipe algorithms → list of passes ("random", or a byte pattern repeated);
#: the bool says whether the last pass is read back and verified (scrub's "verify").
_G = [bytes([b]) for b in (0x55, 0xAA)] + [
    bytes.fromhex(h) for h in ("924924", "492492", "249249")] + [
    bytes([b]) for b in range(0x00, 0x100, 0x11)] + [
    bytes.fromhex(h) for h in ("924924", "492492", "249249", "6db6db", "b6db6d", "db6db6")]
WIPE_ALGORITHMS: dict[str, tuple[list[bytes | str], bool]] = {
    "zero": ([b"\x00"], False),
    "nnsa": (["random", "random", b"\x00"], True),
    "dod": (["random", b"\x00", b"\xff"], True),
    "bsi": ([bytes([b]) for b in (0xFF, 0xFE, 0xFD, 0xFB, 0xF7, 0xEF, 0xDF, 0xBF, 0x7F)],
            False),
    "gutmann": (["random"] * 4 + _G + ["random"] * 4, False),
    "schneier": ([b"\x00", b"\xff"] + ["random"] * 5, False),
    "pfitzner7": (["random"] * 7, False),
    "pfitzner33": (["random"] * 33, False),
    "random": (["random"], False),
    "trim": ([], False),
}


def check_algorithm(algorithm: str) -> None:
    """Refuse an algorithm virsh does not know."""
    if algorithm not in WIPE_ALGORITHMS:
        raise PoolError(f"Unsupported wipe algorithm '{algorithm}'; choose one of "
                        f"{', '.join(WIPE_ALGORITHMS)}")


def check_recreatable(d: VolumeDef, path: str) -> bool:
    """Whether the wiped volume ``d`` (the file ``path``) must be re-created as an empty
    image (any format but raw); refuses, before anything is overwritten, one that cannot
    be."""
    if d.format == "raw":
        return False
    if d.format not in CREATE_FORMATS:
        raise PoolError(f"unsupported: cannot re-create a '{d.format}' volume after "
                        "wiping it")
    if d.encryption is not None:
        raise PoolError("unsupported: wiping an encrypted volume would need its "
                        "secret to re-create it; delete and re-create it instead")
    check_can_create(d.format or "raw")
    if d.capacity is None:
        raise PoolError(f"cannot re-create '{path}': its capacity is not known")
    _check_one_file(path, d.format or "raw")
    if d.format == "vmdk" and d.backing is not None:  # the one input a re-create reads
        from diskimg.vmdk.create import backing_cid

        backing_cid(path, d.backing.path)
    return True


def _check_one_file(path: str, fmt: str) -> None:
    """Refuse an image whose guest data lives in other files too (a qcow2 data file, a
    vmdk's extent files: its declared :meth:`~diskimg.BlockDevice.host_files`): wiping the
    volume file alone would leave that data where it was.  An image that does not open
    names no other file diskimg could wipe: its file is wiped and re-created as before."""
    from diskimg import api
    from diskimg.errors import DiskImgError

    try:
        with api.open(path, "r", fmt, backing=False, force_share=True) as dev:
            others = [str(h.path) for h in dev.host_files()[1:]]
    except DiskImgError:
        return
    if others:
        raise PoolError(f"unsupported: '{path}' keeps guest data in other files too "
                        f"({', '.join(others)}); wiping the volume file alone would leave "
                        "that data in place")


def overwrite(fd: int, size: int, pattern: bytes | str, verify: bool = False,
              done_cb: Callable[[int], None] | None = None) -> None:
    """One wipe pass over [0, size): random bytes, or ``pattern`` repeated from offset 0
    (byte ``i`` is ``pattern[i % len(pattern)]``), fsynced; with ``verify`` every byte is
    read back and compared.  Each write is a whole number of patterns (a 3-byte pattern
    steps by a multiple of 3), so the pattern stays in phase across writes.  ``done_cb``
    is told how many bytes of the pass are written, after each write."""
    if isinstance(pattern, bytes):
        unit = len(pattern)
        chunk = pattern * ((CHUNK // unit) or 1)  # len(chunk) is a multiple of unit
    step = CHUNK if pattern == "random" else len(chunk)
    pos = 0
    last_random: list[bytes] = []
    while pos < size:
        n = min(size - pos, step)
        if pattern == "random":
            buf = os.urandom(n)
            if verify:
                last_random.append(buf)
        else:
            buf = chunk[:n]
        mv = memoryview(buf)
        done = 0
        while done < n:
            done += os.pwrite(fd, mv[done:], pos + done)
        pos += n
        if done_cb is not None:
            done_cb(pos)
    os.fsync(fd)
    if verify:
        pos = 0
        idx = 0
        while pos < size:
            n = min(size - pos, step)
            want = last_random[idx] if pattern == "random" else chunk[:n]
            if os.pread(fd, n, pos) != want:
                raise PoolError(f"wipe verification failed at offset {pos}")
            pos += n
            idx += 1


def wipe_host(host: HostFile, algorithm: str,
              progress: Callable[[float], None] | None = None) -> None:
    """Run ``algorithm``'s passes over the whole of the open, write-locked ``host`` file.
    ``trim`` punches one hole (zeros written where holes are not supported); ``zero`` on a
    sparse file drops every block and keeps the size, as libvirt does.  ``progress`` gets
    the percentage of all passes' bytes written (0 first, 100 last)."""
    from diskimg.ops.chain import _progress_steps

    passes, verify = WIPE_ALGORITHMS[algorithm]
    size = os.fstat(host.fd).st_size
    if algorithm == "trim":
        if not host.punch_hole(0, size):
            overwrite(host.fd, size, b"\x00")
        passes = []
    elif algorithm == "zero" and os.fstat(host.fd).st_blocks * 512 < size:
        # libvirt's way for a sparse file: drop every block, keep the size
        os.ftruncate(host.fd, 0)
        os.ftruncate(host.fd, size)
        passes = []
    if progress is not None:
        progress(0.0)
    step = _progress_steps(progress, len(passes) * size)
    for i, pattern in enumerate(passes):  # the last write of the last pass reports 100

        def done(n: int, base: int = i * size) -> None:
            step(base + n)

        overwrite(host.fd, size, pattern, verify=verify and i == len(passes) - 1,
                  done_cb=done)
    if progress is not None and (not passes or not size):
        progress(100.0)


def recreate(path: str, d: VolumeDef, secrets: Mapping[str, bytes] | None) -> None:
    """Create, in the emptied file ``path``, an image of ``d``'s format, capacity, options
    and backing file (named unchecked, as ``qemu-img create -u``; a vmdk's is read for its
    CID, checked by :func:`check_recreatable`), so the wiped volume stays usable.
    The caller holds QEMU's write lock on ``path`` through its own descriptor (or was told
    to override a running QEMU's): the create neither tests nor takes it."""
    from diskimg.image_create import make_image

    opts: dict[str, Any] = qcow2_options(d) if d.format == "qcow2" else {}
    b = d.backing
    assert d.capacity is not None  # refused by check_recreatable, before the wipe
    make_image(path, d.format or "raw", d.capacity, b.path if b else None,
               (b.format or "raw") if b else None, opts, secrets, lock=False)


__all__ = ["WIPE_ALGORITHMS", "check_algorithm", "check_recreatable", "overwrite",
           "recreate", "wipe_host"]
