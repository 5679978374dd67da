"""Reliability of the NBD server (issue 19 item 5): concurrent clients with every byte
checked against a model, a client killed in the middle of a request, and malformed
traffic.  Each misbehaving client gets an error reply or is disconnected; the server keeps
serving the others, and nothing reaches the image that a client did not write.  The counts
are printed (pytest -s shows them)."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import diskimg
from diskimg.nbd import protocol as p
from diskimg.nbd.session import MAX_OPTIONS
from tests.nbd.nbdtestlib import RawClient

MiB = 1 << 20
Start = Callable[..., Any]


def _image(tmp_path: Path, fmt: str, size: int, seed: int = 7) -> tuple[Path, bytearray]:
    """An image whose every byte is known: random data in its first half."""
    path = tmp_path / f"img.{fmt}"
    diskimg.create(str(path), fmt, size)
    data = bytearray(random.Random(seed).randbytes(size // 2)) + bytearray(size - size // 2)
    with diskimg.open(str(path), "r+", fmt) as dev:
        dev.write(0, data[:size // 2])
    return path, data


def _image_bytes(path: Path, fmt: str) -> bytes:
    with diskimg.open(str(path), "r", fmt) as dev:
        return dev.read(0, dev.size)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_concurrent_clients_against_a_model(tmp_path: Path, inproc_nbd: Start,
                                            fmt: str) -> None:
    n_clients, m_requests, size = 6, 150, 8 * MiB
    path, model = _image(tmp_path, fmt, size)
    served = inproc_nbd(path, fmt, shared=n_clients, discard="unmap")
    sock = served.sock
    slice_ = size // n_clients // 4096 * 4096
    counts: dict[str, int] = {}
    lock = threading.Lock()
    failures: list[str] = []

    def client(k: int) -> None:
        rng = random.Random(1000 + k)
        lo = k * slice_
        c = RawClient(sock, contexts=("base:allocation",))
        try:
            for _ in range(m_requests):
                off = lo + rng.randrange(0, slice_ - 1)
                n = rng.randrange(1, min(slice_ - (off - lo), 300_000) + 1)
                op = rng.choice(("read", "read", "write", "zero", "trim", "flush", "status"))
                if op == "read":
                    err, got, _ = c.request(p.NBD_CMD_READ, off, n,
                                            rng.choice((0, p.NBD_CMD_FLAG_DF)))
                    if err or got != bytes(model[off:off + n]):
                        failures.append(f"client {k}: read {off}+{n} err={err}")
                elif op == "write":
                    data = rng.randbytes(n)
                    err = c.request(p.NBD_CMD_WRITE, off, flags=rng.choice(
                        (0, p.NBD_CMD_FLAG_FUA)), data=data)[0]
                    model[off:off + n] = data
                elif op == "zero":
                    err = c.request(p.NBD_CMD_WRITE_ZEROES, off, n, rng.choice(
                        (0, p.NBD_CMD_FLAG_NO_HOLE)))[0]
                    model[off:off + n] = bytes(n)
                elif op == "trim":
                    # a discarded range has unspecified contents: zero it right after,
                    # so the model stays exact (and TRIM's effect is exercised)
                    err = c.request(p.NBD_CMD_TRIM, off, n)[0] or \
                        c.request(p.NBD_CMD_WRITE_ZEROES, off, n)[0]
                    model[off:off + n] = bytes(n)
                elif op == "flush":
                    err = c.request(p.NBD_CMD_FLUSH)[0]
                else:
                    err, _, st = c.request(p.NBD_CMD_BLOCK_STATUS, off, n)
                    ext = st[0].extents
                    if sum(e[0] for e in ext) > n:
                        failures.append(f"client {k}: block status past the request")
                    pos = off
                    for length, flags in ext:  # a range reported as zeros reads as zeros
                        if flags & p.NBD_STATE_ZERO and any(model[pos:pos + length]):
                            failures.append(f"client {k}: {pos}+{length} reported zero")
                        pos += length
                if err:
                    failures.append(f"client {k}: {op} {off}+{n} failed with {err}")
                with lock:
                    counts[op] = counts.get(op, 0) + 1
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:10]
    total = sum(counts.values())
    print(f"\n[nbd concurrency {fmt}] {n_clients} clients x {m_requests} requests = "
          f"{total}: {dict(sorted(counts.items()))}")
    assert total == n_clients * m_requests
    served.stop()
    # the image holds exactly what the clients wrote (the model), every byte
    assert _image_bytes(path, fmt) == bytes(model)


def test_client_killed_mid_request_changes_nothing(tmp_path: Path, inproc_nbd: Start) -> None:
    path, model = _image(tmp_path, "qcow2", 4 * MiB)
    served = inproc_nbd(path, "qcow2")
    sock, srv = served.sock, served.server
    good = RawClient(sock)
    for cut in (0, 1, 27, 28 + 1000, 28 + 65535):
        bad = RawClient(sock)
        wire = p.pack_request(p.NBD_CMD_WRITE, 1, 512 * 1024, 65536) + b"\xee" * 65536
        bad.send(wire[:cut])
        # killed: the kernel resets the connection (SO_LINGER 0)
        bad.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bad.sock.close()
        err, got, _ = good.request(p.NBD_CMD_READ, 0, 4 * MiB)
        assert err == 0 and got == bytes(model)
    # a client killed while its read reply is being sent
    for _ in range(3):
        bad = RawClient(sock)
        bad.send(p.pack_request(p.NBD_CMD_READ, 9, 0, 4 * MiB))
        bad.recv(100)
        bad.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bad.sock.close()
    err, got, _ = good.request(p.NBD_CMD_READ, 0, 4 * MiB)
    assert err == 0 and got == bytes(model)
    good.close()
    served.stop()
    print(f"\n[nbd killed clients] connections={srv.connections} requests={srv.requests}")
    assert _image_bytes(path, "qcow2") == bytes(model)


def _expect_error(c: RawClient, cmd: int, offset: int, length: int, flags: int,
                  want: int) -> None:
    err, _, _ = c.request(cmd, offset, length, flags)
    assert err == want, (cmd, offset, length, flags, err)


def test_malformed_requests_get_error_replies(tmp_path: Path, inproc_nbd: Start) -> None:
    size = 4 * MiB
    path, model = _image(tmp_path, "raw", size)
    served = inproc_nbd(path, "raw")
    sock, srv = served.sock, served.server
    for structured in (True, False):
        c = RawClient(sock, structured=structured)
        cases = [
            (p.NBD_CMD_READ, size - 512, 1024, 0, p.NBD_EINVAL),        # past the end
            (p.NBD_CMD_READ, 1 << 62, 512, 0, p.NBD_EINVAL),
            (p.NBD_CMD_READ, 0, 64 * MiB, 0, p.NBD_EINVAL),             # > 32 MiB
            (p.NBD_CMD_WRITE_ZEROES, size, 1, 0, p.NBD_ENOSPC),
            (p.NBD_CMD_TRIM, size - 1, 2, 0, p.NBD_EINVAL),
            (p.NBD_CMD_CACHE, size, 1, 0, p.NBD_EINVAL),
            (99, 0, 512, 0, p.NBD_EINVAL),                              # unknown command
            (p.NBD_CMD_RESIZE, 0, 0, 0, p.NBD_EINVAL),
            (p.NBD_CMD_READ, 0, 512, 1 << 9, p.NBD_EINVAL),              # unknown flag
            (p.NBD_CMD_WRITE_ZEROES, 0, 512, p.NBD_CMD_FLAG_REQ_ONE, p.NBD_EINVAL),
            (p.NBD_CMD_BLOCK_STATUS, 0, 512, 0, p.NBD_EINVAL),          # no context
        ]
        if not structured:   # DF needs structured replies
            cases.append((p.NBD_CMD_READ, 0, 512, p.NBD_CMD_FLAG_DF, p.NBD_EINVAL))
        for case in cases:
            _expect_error(c, *case)
        # a write past the end: the payload is read (the stream stays in step), ENOSPC
        assert c.request(p.NBD_CMD_WRITE, size - 10, data=b"x" * 20)[0] == p.NBD_ENOSPC
        err, got, _ = c.request(p.NBD_CMD_READ, 0, size)
        assert err == 0 and got == bytes(model)
        c.close()
    served.stop()
    print(f"\n[nbd malformed requests] error replies={srv.error_replies}")
    assert _image_bytes(path, "raw") == bytes(model)


def test_read_only_export_refuses_writes(tmp_path: Path, inproc_nbd: Start) -> None:
    path, model = _image(tmp_path, "qcow2", MiB)
    served = inproc_nbd(path, "qcow2", read_only=True)
    c = RawClient(served.sock)
    assert c.flags & p.NBD_FLAG_READ_ONLY
    assert c.request(p.NBD_CMD_WRITE, 0, data=b"z" * 512)[0] == p.NBD_EPERM
    _expect_error(c, p.NBD_CMD_WRITE_ZEROES, 0, 512, 0, p.NBD_EPERM)
    _expect_error(c, p.NBD_CMD_TRIM, 0, 512, 0, p.NBD_EPERM)
    assert c.request(p.NBD_CMD_FLUSH)[0] == 0
    c.close()
    served.stop()
    assert _image_bytes(path, "qcow2") == bytes(model)


def _drops(sock: str, wire: bytes, *, greet: bool = True) -> bool:
    c = RawClient(sock, handshake=False)
    if greet:
        c.greet()
    try:
        c.send(wire)
    except OSError:
        return True
    return c.closed_by_server()


def test_protocol_violations_disconnect_that_client_only(tmp_path: Path,
                                                         inproc_nbd: Start) -> None:
    size = 2 * MiB
    path, model = _image(tmp_path, "raw", size)
    served = inproc_nbd(path, "raw", shared=3, handshake_timeout=0.5)
    sock, srv = served.sock, served.server
    good = RawClient(sock)
    dropped = 0
    # handshake: bad client flags, bad option magic, a huge option length
    c = RawClient(sock, handshake=False)
    c.recv(p.SERVER_GREETING_SIZE)
    c.send(p.pack_client_flags(0x80))
    assert c.closed_by_server()
    dropped += 1
    assert _drops(sock, struct.pack(">QII", 0xBAD, p.NBD_OPT_GO, 0))
    assert _drops(sock, p.pack_option_header(p.NBD_OPT_GO, 0xFFFFFFFF))
    assert _drops(sock, p.pack_option(p.NBD_OPT_EXPORT_NAME, b"no-such-export"))
    dropped += 3
    # transmission: bad magic, a write longer than 32 MiB
    for wire in (b"\x00" * 28, p.pack_request(p.NBD_CMD_WRITE, 1, 0, 64 * MiB)):
        c = RawClient(sock)
        c.send(wire)
        assert c.closed_by_server()
        dropped += 1
    # unknown options and bad payloads get error replies; the handshake goes on
    c = RawClient(sock, handshake=False)
    c.greet()
    assert c.option(77)[-1][0] == p.NBD_REP_ERR_UNSUP
    assert c.option(p.NBD_OPT_LIST, b"junk")[-1][0] == p.NBD_REP_ERR_INVALID
    assert c.option(p.NBD_OPT_GO, b"\xff\xff\xff\xff")[-1][0] == p.NBD_REP_ERR_INVALID
    assert c.option(p.NBD_OPT_GO, p.pack_info_request("nope"))[-1][0] == \
        p.NBD_REP_ERR_UNKNOWN
    assert c.option(p.NBD_OPT_SET_META_CONTEXT,
                    p.pack_meta_context_request("", ("base:allocation",)))[-1][0] == \
        p.NBD_REP_ERR_INVALID                  # before structured replies
    assert c.option(p.NBD_OPT_STARTTLS)[-1][0] == p.NBD_REP_ERR_POLICY
    c.go()
    assert c.request(p.NBD_CMD_READ, 0, 4096)[1] == bytes(model[:4096])
    c.close()
    # an option flood: the server hangs up after MAX_OPTIONS options
    c = RawClient(sock, handshake=False)
    c.greet()
    flood = p.pack_option(p.NBD_OPT_LIST) * (MAX_OPTIONS + 10)
    try:
        c.send(flood)
    except OSError:
        pass
    assert c.closed_by_server()
    dropped += 1
    # a slow-loris handshake: one byte now and then, past the 0.5 s limit
    c = RawClient(sock, handshake=False)
    c.greet()
    t0 = time.monotonic()
    try:
        for b in p.pack_option(p.NBD_OPT_GO, p.pack_info_request("")):
            c.send(bytes([b]))
            time.sleep(0.1)
    except OSError:
        pass
    assert c.closed_by_server()
    assert time.monotonic() - t0 < 5
    dropped += 1
    # an idle connection that never sends its flags is dropped too
    c = RawClient(sock, handshake=False)
    assert c.closed_by_server()
    dropped += 1
    # the well-behaved client was served throughout
    err, got, _ = good.request(p.NBD_CMD_READ, 0, size)
    assert err == 0 and got == bytes(model)
    good.close()
    served.stop()
    print(f"\n[nbd protocol violations] {dropped} clients dropped, "
          f"connections={srv.connections}")
    assert _image_bytes(path, "raw") == bytes(model)


def test_meta_context_queries(tmp_path: Path, inproc_nbd: Start) -> None:
    path = tmp_path / "m.qcow2"
    diskimg.create(str(path), "qcow2", 4 * MiB)
    with diskimg.open(str(path), "r+") as dev:
        dev.bitmaps.add("b0")
        dev.write(MiB, b"\x01" * 65536)
    served = inproc_nbd(path, "qcow2", allocation_depth=True, bitmaps=["b0"])
    c = RawClient(served.sock, handshake=False)
    c.greet()
    assert c.option(p.NBD_OPT_STRUCTURED_REPLY)[-1][0] == p.NBD_REP_ACK

    def names(opt: int, *queries: str) -> list[str]:
        reps = c.option(opt, p.pack_meta_context_request("", queries))
        assert reps[-1][0] == p.NBD_REP_ACK
        return [p.parse_rep_meta_context(d).name for t, d in reps[:-1]]

    everything = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    assert names(p.NBD_OPT_LIST_META_CONTEXT) == everything
    assert names(p.NBD_OPT_LIST_META_CONTEXT, "qemu:") == everything[1:]
    assert names(p.NBD_OPT_LIST_META_CONTEXT, "qemu:dirty-bitmap:") == everything[2:]
    assert names(p.NBD_OPT_LIST_META_CONTEXT, "base:", "x-y:z") == everything[:1]
    assert names(p.NBD_OPT_SET_META_CONTEXT, "qemu:") == []
    assert names(p.NBD_OPT_SET_META_CONTEXT, *everything, "nope:x") == everything
    c.go()
    err, _, st = c.request(p.NBD_CMD_BLOCK_STATUS, 0, 4 * MiB)
    assert err == 0
    assert [s.extents for s in st] == [
        ((MiB, 3), (65536, 0), (3 * MiB - 65536, 3)),
        ((MiB, 0), (65536, 1), (3 * MiB - 65536, 0)),
        ((MiB, 0), (65536, 1), (3 * MiB - 65536, 0)),
    ]
    err, _, st = c.request(p.NBD_CMD_BLOCK_STATUS, 0, 4 * MiB, p.NBD_CMD_FLAG_REQ_ONE)
    assert [s.extents for s in st] == [((MiB, 3),), ((MiB, 0),), ((MiB, 0),)]
    # the bitmap follows writes made through the export
    assert c.request(p.NBD_CMD_WRITE, 3 * MiB, data=b"\x02" * 512)[0] == 0
    err, _, st = c.request(p.NBD_CMD_BLOCK_STATUS, 3 * MiB, MiB)
    assert st[2].extents[0][1] == 1
    c.close()


def test_memory_stays_bounded_under_huge_lengths(tmp_path: Path, sockdir: Path) -> None:
    """A ``diskimg nbd -e 4`` process: four clients read 32 MiB (the largest request),
    then claim 4 GiB reads, writes and options; the server's peak RSS stays within four
    32 MiB request buffers (plus the send path) over the interpreter, and it still
    serves."""
    import sys

    from qemukit import serving

    size = 34 * MiB
    path, model = _image(tmp_path, "raw", size)
    sock = str(sockdir / "mem.sock")
    argv = [sys.executable, "-m", "diskimg", "nbd", "-t", "-e", "4", "-f", "raw", "-k", sock,
            str(path)]
    with serving(argv, sock) as proc:
        def hwm() -> int:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            raise AssertionError("no VmHWM")

        idle = hwm()
        clients = [RawClient(sock, structured=bool(k % 2)) for k in range(4)]
        for k, c in enumerate(clients):
            err, got, _ = c.request(p.NBD_CMD_READ, k * MiB // 2, 32 * MiB)
            assert err == 0 and got == bytes(model[k * MiB // 2:k * MiB // 2 + 32 * MiB])
            for _ in range(5):
                assert c.request(p.NBD_CMD_READ, 0, 0xFFFFFFFF)[0] == p.NBD_EINVAL
                assert c.request(p.NBD_CMD_BLOCK_STATUS, 0, 0xFFFFFFFF)[0] == p.NBD_EINVAL
        for c in clients:
            c.send(p.pack_request(p.NBD_CMD_WRITE, 1, 0, 0xFFFFFFFF))
            assert c.closed_by_server()
        for _ in range(4):
            c = RawClient(sock, handshake=False)
            c.greet()
            c.send(p.pack_option_header(p.NBD_OPT_GO, 0xFFFFFFFF))
            assert c.closed_by_server()
        peak = hwm()
        good = RawClient(sock)
        err, got, _ = good.request(p.NBD_CMD_READ, size - MiB, MiB)
        assert err == 0 and got == bytes(model[-MiB:])
        good.close()
    print(f"\n[nbd memory] peak RSS {peak / MiB:.1f} MiB (idle {idle / MiB:.1f} MiB)")
    # 4 connections x one 32 MiB buffer, with room for the reads' own temporaries
    assert peak - idle < 4 * 32 * MiB + 64 * MiB
    assert _image_bytes(path, "raw") == bytes(model)


STREAMS = 40


def test_mutated_sessions(tmp_path: Path, inproc_nbd: Start) -> None:
    """Mutated copies of whole valid sessions (handshake and requests) against a
    read-only export: each one ends with an error reply or a disconnect, the server
    keeps serving a good client, and the image is unchanged.  fuzz/nbd_server.py runs
    the same with more streams."""
    from tests.nbd.nbdtestlib import fuzz_one, mutate, valid_transcript

    size = 2 * MiB
    path, model = _image(tmp_path, "qcow2", size)
    served = inproc_nbd(path, "qcow2", read_only=True, allocation_depth=True,
                        handshake_timeout=1.0)
    rng = random.Random(19)
    outcomes: dict[str, int] = {}
    good = RawClient(served.sock)
    for i in range(STREAMS):
        o = fuzz_one(served.sock, mutate(rng, valid_transcript(rng, size)), wait=0.1)
        outcomes[o] = outcomes.get(o, 0) + 1
        if i % 10 == 9:
            err, got, _ = good.request(p.NBD_CMD_READ, 0, size)
            assert err == 0 and got == bytes(model)
    good.close()
    served.stop()
    print(f"\n[nbd mutated sessions] {STREAMS} streams: {outcomes}, "
          f"server requests={served.server.requests}, "
          f"error replies={served.server.error_replies}")
    assert _image_bytes(path, "qcow2") == bytes(model)
