"""Shared machinery of the robustness tests and the deeper harnesses in ``fuzz/``.

- *base images*: small valid qcow2/vmdk images made with qemu-img/qemu-io and with diskimg
  (:func:`build_qcow2_bases`, :func:`build_vmdk_bases`);
- *field tables*: every metadata field of such an image (header, extensions, L1/L2 entries,
  refcount table and blocks, snapshot table, LUKS header; vmdk header, grain directory and
  tables, stream markers) with its offset, width and original value, parsed here
  independently of diskimg (:func:`qcow2_layout`, :func:`vmdk_layout`);
- *mutations*: ``(offset, new bytes)`` patches and truncations, drawn by hypothesis either
  from the field tables (targeted values: boundaries, bit flips, other tables' offsets) or
  as random byte flips inside the metadata regions (:func:`mutations`);
- a *worker client* (:class:`Worker`): each mutated image is run in a separate, long-lived
  Python process (``robust_worker.py``) under ``RLIMIT_AS``/``RLIMIT_FSIZE`` and a
  ``signal.alarm`` time limit, so a hang, a runaway allocation or an interpreter crash is
  reported as a finding instead of taking the test run down.

This module imports nothing from diskimg on purpose: the field tables must not share the
parser under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemukit import QEMU

HERE = Path(__file__).resolve().parent
WORKER = HERE / "robust_worker.py"
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

LUKS_SECRET_ARGS = ["--object", "secret,id=s0,data=pw"]
LUKS_OPEN = {"secrets": {"s0": "pw"}, "options": {"encrypt.key-secret": "s0"}}
#: diskimg's cap on PBKDF2 iterations (crypto/luks.py MAX_PBKDF2_ITERATIONS, ~25 s here).
#: Values between a few times the original and this cap are legitimately slow to unlock,
#: so the fuzzer does not draw them for iteration fields (see docs/robustness.md).
LUKS_MAX_ITER = 100_000_000


# --- records ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One metadata field: ``kind`` is "be"/"le" (unsigned int of ``size`` bytes),
    "iter" (a big-endian PBKDF2 iteration count) or "bytes"."""

    name: str
    offset: int
    size: int
    kind: str
    orig: int | bytes


@dataclass
class Layout:
    fields: list[Field] = field(default_factory=list)
    regions: list[tuple[str, int, int]] = field(default_factory=list)  # (name, offset, len)
    interesting: set[int] = field(default_factory=set)  # offsets worth writing into fields
    cluster_size: int = 512

    def add(self, name: str, off: int, size: int, kind: str, data: bytes) -> None:
        if off < 0 or size <= 0 or off + size > len(data):
            return
        raw = data[off : off + size]
        if kind == "bytes":
            orig: int | bytes = bytes(raw)
        else:
            orig = int.from_bytes(raw, "little" if kind == "le" else "big")
        self.fields.append(Field(name, off, size, kind, orig))

    def region(self, name: str, off: int, size: int, data: bytes) -> None:
        size = min(size, len(data) - off)
        if off >= 0 and size > 0:
            self.regions.append((name, off, size))


@dataclass
class BaseImage:
    """A valid image to mutate.  ``extra`` files are copied beside it (backing files)."""

    name: str
    path: Path
    fmt: str
    data: bytes
    layout: Layout
    open_kwargs: dict[str, Any] = field(default_factory=dict)
    luks: bool = False
    extra: list[Path] = field(default_factory=list)


# --- qcow2 field tables -------------------------------------------------------------------
_QHDR = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
         ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
         ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
         ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
         ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8)]
_QHDR3 = [("incompatible_features", 72, 8), ("compatible_features", 80, 8),
          ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
          ("header_length", 100, 4)]
_LUKS_HDR = [("magic", 0, 6, "bytes"), ("version", 6, 2, "be"),
             ("cipher_name", 8, 32, "bytes"), ("cipher_mode", 40, 32, "bytes"),
             ("hash_spec", 72, 32, "bytes"), ("payload_offset", 104, 4, "be"),
             ("key_bytes", 108, 4, "be"), ("mk_digest", 112, 20, "bytes"),
             ("mk_digest_salt", 132, 32, "bytes"), ("mk_digest_iter", 164, 4, "iter"),
             ("uuid", 168, 40, "bytes")]
_LUKS_SLOT = [("active", 0, 4, "be"), ("iterations", 4, 4, "iter"), ("salt", 8, 32, "bytes"),
              ("key_material_offset", 40, 4, "be"), ("stripes", 44, 4, "be")]
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def _u(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off : off + n], "big") if off + n <= len(data) else 0


def qcow2_layout(data: bytes, *, max_l2_fields: int = 48) -> Layout:
    """Field table and metadata regions of a valid qcow2 image (bytes of the whole file)."""
    lay = Layout()
    cb = _u(data, 20, 4)
    cs = 1 << cb
    lay.cluster_size = cs
    version = _u(data, 4, 4)
    for name, off, n in _QHDR:
        lay.add(f"header.{name}", off, n, "be", data)
    hdr_len = 72
    refcount_order = 4
    if version >= 3:
        for name, off, n in _QHDR3:
            lay.add(f"header.{name}", off, n, "be", data)
        hdr_len = _u(data, 100, 4)
        refcount_order = _u(data, 96, 4)
        if hdr_len > 104:
            lay.add("header.compression_type", 104, 1, "be", data)
    fsize = len(data)
    lay.interesting |= {0, cs, fsize, fsize - cs, fsize + cs, 1 << 40, (1 << 56) - cs,
                        (1 << 63) - cs}
    # header extensions
    bf_off = _u(data, 8, 8)
    end = min(cs, bf_off) if bf_off else cs
    off = hdr_len
    i = 0
    fde: tuple[int, int] | None = None
    while off + 8 <= end:
        etype, elen = _u(data, off, 4), _u(data, off + 4, 4)
        lay.add(f"ext[{i}].type", off, 4, "be", data)
        lay.add(f"ext[{i}].length", off + 4, 4, "be", data)
        if etype == 0:
            break
        if etype == 0x0537BE77 and elen == 16:
            lay.add(f"ext[{i}].fde_offset", off + 8, 8, "be", data)
            lay.add(f"ext[{i}].fde_length", off + 16, 8, "be", data)
            fde = (_u(data, off + 8, 8), _u(data, off + 16, 8))
        elif etype == 0x6803F857:  # feature name table: first entries only
            for k in range(min(3, elen // 48)):
                lay.add(f"ext[{i}].feature[{k}]", off + 8 + 48 * k, 48, "bytes", data)
        else:
            lay.add(f"ext[{i}].data", off + 8, min(elen, 64), "bytes", data)
        off += 8 + elen + (-elen % 8)
        i += 1
    lay.region("header+extensions", 0, max(off + 8, 112), data)
    if bf_off:
        bf_size = _u(data, 16, 4)
        lay.add("backing_file_name", bf_off, bf_size, "bytes", data)
        lay.region("backing_file_name", bf_off, bf_size, data)
    # L1 and L2 tables
    l1_size, l1_off = _u(data, 36, 4), _u(data, 40, 8)
    lay.interesting.add(l1_off)
    lay.region("L1", l1_off, l1_size * 8, data)
    extl2 = version >= 3 and bool(_u(data, 72, 8) & 16)
    esz = 16 if extl2 else 8

    def walk_l1(tag: str, base: int, n: int) -> None:
        for k in range(n):
            ent = _u(data, base + 8 * k, 8)
            if k < 32 or ent:
                lay.add(f"{tag}[{k}]", base + 8 * k, 8, "be", data)
            l2 = ent & L2_OFFSET_MASK
            if not l2 or l2 + cs > fsize:
                continue
            lay.interesting.add(l2)
            lay.region(f"{tag}[{k}].L2", l2, cs, data)
            picked = 0
            for j in range(cs // esz):
                e = _u(data, l2 + esz * j, 8)
                if (e or j < 2) and picked < max_l2_fields:
                    picked += 1
                    lay.add(f"{tag}[{k}].L2[{j}]", l2 + esz * j, 8, "be", data)
                    if extl2:
                        lay.add(f"{tag}[{k}].L2[{j}].bitmap", l2 + esz * j + 8, 8, "be", data)
                    host = e & L2_OFFSET_MASK
                    if host and not e & (1 << 62):
                        lay.interesting.add(host)
                    elif e & (1 << 62) and sum(".compressed" in n for n, _, _ in
                                               lay.regions) < 4:
                        # compressed cluster: flips in its deflate/zstd bytes too
                        x = 62 - (cb - 8)
                        coff = e & ((1 << x) - 1)
                        nsec = (e >> x) & ((1 << (cb - 8)) - 1)
                        lay.region(f"{tag}[{k}].L2[{j}].compressed", coff,
                                   min(64, (nsec + 1) * 512 - (coff & 511)), data)

    walk_l1("L1", l1_off, min(l1_size, 4096))
    # refcount table and blocks
    rt_off, rt_clusters = _u(data, 48, 8), _u(data, 56, 4)
    lay.interesting.add(rt_off)
    nclusters = -(-fsize // cs)
    rbits = 1 << refcount_order
    per_block = cs * 8 // rbits
    used_rt = -(-nclusters // per_block)
    lay.region("refcount_table", rt_off, max(64, used_rt * 8 + 16), data)
    for k in range(min(rt_clusters * cs // 8, max(used_rt + 1, 2))):
        lay.add(f"reftable[{k}]", rt_off + 8 * k, 8, "be", data)
        rb = _u(data, rt_off + 8 * k, 8)
        if not rb or rb + cs > fsize:
            continue
        lay.interesting.add(rb)
        n = min(per_block, nclusters - k * per_block)
        lay.region(f"refblock[{k}]", rb, max(1, n * rbits // 8), data)
        w = max(1, rbits // 8)
        for j in range(0, min(n, 64)):
            lay.add(f"refblock[{k}][{j}]", rb + (j * rbits // 8), w, "be", data)
    # snapshots
    nb, sn_off = _u(data, 60, 4), _u(data, 64, 8)
    if nb:
        lay.interesting.add(sn_off)
        pos = sn_off
        for k in range(min(nb, 16)):
            l1o, l1n = _u(data, pos, 8), _u(data, pos + 8, 4)
            id_len, name_len = _u(data, pos + 12, 2), _u(data, pos + 14, 2)
            extra = _u(data, pos + 36, 4)
            for name, o, n in [("l1_table_offset", 0, 8), ("l1_size", 8, 4), ("id_len", 12, 2),
                               ("name_len", 14, 2), ("date_sec", 16, 4),
                               ("date_nsec", 20, 4), ("vm_clock_nsec", 24, 8),
                               ("vm_state_size", 32, 4), ("extra_data_size", 36, 4)]:
                lay.add(f"snapshot[{k}].{name}", pos + o, n, "be", data)
            for name, o in [("vm_state_size_large", 0), ("disk_size", 8), ("icount", 16)]:
                if extra >= o + 8:
                    lay.add(f"snapshot[{k}].{name}", pos + 40 + o, 8, "be", data)
            p = pos + 40 + extra
            lay.add(f"snapshot[{k}].id", p, id_len, "bytes", data)
            lay.add(f"snapshot[{k}].name", p + id_len, name_len, "bytes", data)
            ln = 40 + extra + id_len + name_len
            pos += ln + (-ln % 8)
            lay.interesting.add(l1o)
            walk_l1(f"snapshot[{k}].L1", l1o, min(l1n, 64))
        lay.region("snapshot_table", sn_off, pos - sn_off, data)
    # LUKS header
    if fde is not None:
        base, _length = fde
        lay.interesting.add(base)
        lay.region("luks_header", base, 592, data)
        for name, o, n, kind in _LUKS_HDR:
            lay.add(f"luks.{name}", base + o, n, kind, data)
        for s in range(8):
            so = base + 208 + 48 * s
            for name, o, n, kind in _LUKS_SLOT:
                lay.add(f"luks.slot[{s}].{name}", so + o, n, kind, data)
        km = _u(data, base + 208 + 40, 4) * 512
        kb = _u(data, base + 108, 4)
        if km and kb:
            lay.region("luks.slot[0].key_material", base + km, kb * 4000, data)
    return lay


# --- vmdk field tables --------------------------------------------------------------------
_VHDR = [("version", 4, 4), ("flags", 8, 4), ("capacity", 12, 8), ("grainSize", 20, 8),
         ("descriptorOffset", 28, 8), ("descriptorSize", 36, 8), ("numGTEsPerGT", 44, 4),
         ("rgdOffset", 48, 8), ("gdOffset", 56, 8), ("overHead", 64, 8),
         ("uncleanShutdown", 72, 1), ("compressAlgorithm", 77, 2)]


def _le(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off : off + n], "little") if off + n <= len(data) else 0


def _vmdk_header_fields(lay: Layout, tag: str, base: int, data: bytes) -> None:
    lay.add(f"{tag}.magic", base, 4, "bytes", data)
    lay.add(f"{tag}.eol", base + 73, 4, "bytes", data)
    for name, off, n in _VHDR:
        lay.add(f"{tag}.{name}", base + off, n, "le", data)


def _vmdk_tables(lay: Layout, tag: str, gd_sec: int, ngt: int, gtes: int, data: bytes) -> None:
    gd = gd_sec * 512
    lay.region(f"{tag}", gd, ngt * 4, data)
    for k in range(min(ngt, 64)):
        lay.add(f"{tag}[{k}]", gd + 4 * k, 4, "le", data)
        gt = _le(data, gd + 4 * k, 4) * 512
        if not gt or gt + gtes * 4 > len(data):
            continue
        lay.interesting.add(gt // 512)
        lay.region(f"{tag}[{k}].GT", gt, gtes * 4, data)
        picked = 0
        for j in range(gtes):
            e = _le(data, gt + 4 * j, 4)
            if (e or j < 2) and picked < 48:
                picked += 1
                lay.add(f"{tag}[{k}].GT[{j}]", gt + 4 * j, 4, "le", data)
                if e > 1:
                    lay.interesting.add(e)


def vmdk_layout(data: bytes) -> Layout:
    """Field table of a monolithicSparse or streamOptimized extent (sectors are offsets)."""
    lay = Layout(cluster_size=512)
    fsize = len(data)
    fsec = fsize // 512
    lay.interesting |= {0, 1, 2, fsec, fsec - 1, fsec + 1, 1 << 32, (1 << 63) // 512}
    _vmdk_header_fields(lay, "header", 0, data)
    lay.region("header", 0, 80, data)
    doff, dsize = _le(data, 28, 8), _le(data, 36, 8)
    if doff:
        desc = data[doff * 512 : doff * 512 + dsize * 512].split(b"\0", 1)[0]
        lay.region("descriptor", doff * 512, len(desc), data)
        # every line of the descriptor as a bytes field (mutated in place)
        p = doff * 512
        for k, line in enumerate(desc.split(b"\n")):
            if line:
                lay.add(f"descriptor.line[{k}]", p, len(line), "bytes", data)
            p += len(line) + 1
    cap, grain, gtes = _le(data, 12, 8), _le(data, 20, 8), _le(data, 44, 4)
    gd_off, rgd_off = _le(data, 56, 8), _le(data, 48, 8)
    hdr_base = 0
    if gd_off == 0xFFFFFFFFFFFFFFFF and fsize >= 1536:
        # streamOptimized: the real header is the footer (EOF-1024); markers around it
        hdr_base = fsize - 1024
        _vmdk_header_fields(lay, "footer", hdr_base, data)
        lay.region("footer", hdr_base, 80, data)
        for tag, mo in (("footer_marker", fsize - 1536), ("eos_marker", fsize - 512)):
            lay.add(f"{tag}.value", mo, 8, "le", data)
            lay.add(f"{tag}.size", mo + 8, 4, "le", data)
            lay.add(f"{tag}.type", mo + 12, 4, "le", data)
            lay.region(tag, mo, 16, data)
        cap, grain, gtes = _le(data, hdr_base + 12, 8), _le(data, hdr_base + 20, 8), \
            _le(data, hdr_base + 44, 4)
        gd_off, rgd_off = _le(data, hdr_base + 56, 8), 0
        # walk the markers from overHead
        pos = _le(data, 64, 8) * 512
        k = 0
        while pos + 16 <= fsize - 1536 and k < 200:
            val, size = _le(data, pos, 8), _le(data, pos + 8, 4)
            if size:
                lay.add(f"grain[{k}].lba", pos, 8, "le", data)
                lay.add(f"grain[{k}].size", pos + 8, 4, "le", data)
                lay.region(f"grain[{k}].data", pos + 12, min(size, 64), data)
                pos += -(-(12 + size) // 512) * 512
            else:
                mtype = _le(data, pos + 12, 4)
                lay.add(f"marker[{k}].numSectors", pos, 8, "le", data)
                lay.add(f"marker[{k}].type", pos + 12, 4, "le", data)
                if mtype == 0:
                    break
                pos += 512 + val * 512
            k += 1
    if not grain or not gtes:
        return lay
    ngt = -(-cap // (grain * gtes))
    lay.interesting |= {gd_off, rgd_off}
    if gd_off and gd_off != 0xFFFFFFFFFFFFFFFF:
        _vmdk_tables(lay, "GD", gd_off, ngt, gtes, data)
    if rgd_off:
        _vmdk_tables(lay, "RGD", rgd_off, ngt, gtes, data)
    return lay


# --- hypothesis strategies ----------------------------------------------------------------
def _int_candidates(f: Field, lay: Layout) -> list[int]:
    bits = 8 * f.size
    mx = (1 << bits) - 1
    v = int(f.orig)  # type: ignore[arg-type]
    cs = lay.cluster_size
    c = {0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, mx, mx - 1, mx >> 1,
         (mx >> 1) + 1, v + 1, v - 1, v * 2, v // 2, v + 8, v + 512, v + cs, v - cs, v * cs,
         v + 4096, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 20, 1 << 30, 9, 21, 22, 63, 64}
    c |= lay.interesting
    return sorted({x & mx for x in c if x >= 0})


def field_strategy(f: Field, lay: Layout) -> Any:
    """Strategy for the new bytes of field ``f``."""
    from hypothesis import strategies as st

    if f.kind == "bytes":
        n = f.size
        orig = bytes(f.orig)  # type: ignore[arg-type]

        def flip(t: tuple[int, int]) -> bytes:
            b = bytearray(orig)
            b[t[0]] ^= t[1]
            return bytes(b)

        return st.one_of(
            st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(flip),
            st.binary(min_size=n, max_size=n),
            st.sampled_from([bytes(n), b"\xff" * n, (b"../" * n)[:n], (b"/etc/passwd" * n)[:n],
                             (b'json:{"a":1}' * n)[:n], (b"\0" + orig)[:n],
                             orig.replace(b"1", b"9")]),
        )
    bits = 8 * f.size
    mx = (1 << bits) - 1
    v = int(f.orig)  # type: ignore[arg-type]
    order = "little" if f.kind == "le" else "big"
    if f.kind == "iter":
        # no value in (4*orig, LUKS_MAX_ITER]: those unlock slowly by design
        cands = sorted({0, 1, 2, 999, 1000, v, v + 1, max(v - 1, 0), v * 2, v * 4,
                        LUKS_MAX_ITER + 1, 1 << 31, mx})
        ints = st.one_of(st.sampled_from(cands), st.integers(0, 4 * v),
                         st.integers(LUKS_MAX_ITER + 1, mx))
    else:
        ints = st.one_of(
            st.sampled_from(_int_candidates(f, lay)),
            st.integers(0, bits - 1).map(lambda k: v ^ (1 << k)),
            st.integers(0, mx),
            st.integers(-64, 64).map(lambda d: (v + d) & mx),
        )
    return ints.map(lambda x: (x & mx).to_bytes(f.size, order))


def mutation_strategy(base: BaseImage, *, max_mutations: int = 4) -> Any:
    """A list of ``("set", offset, bytes)`` / ``("trunc", length)`` mutations."""
    from hypothesis import strategies as st

    lay = base.layout
    fields = lay.fields
    regions = lay.regions
    targeted = st.sampled_from(fields).flatmap(
        lambda f: field_strategy(f, lay).map(lambda b: ("set", f.offset, b, f.name)))

    def flip_in(r: tuple[str, int, int]) -> Any:
        name, off, n = r
        return st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
            lambda t: ("xor", off + t[0], t[1], f"{name}+{t[0]}"))

    flips = st.sampled_from(regions).flatmap(flip_in)
    ends = sorted({o for _, o, _ in regions} | {o + n for _, o, n in regions}
                  | {len(base.data) - 1, len(base.data) // 2, 72, 104, 512})
    trunc = st.one_of(st.sampled_from(ends), st.integers(0, len(base.data))).map(
        lambda n: ("trunc", n, b"", f"truncate to {n}"))
    # truncations a fifth of the time: the other kinds are listed twice
    one = st.one_of(targeted, targeted, flips, flips, trunc)
    return st.lists(one, min_size=1, max_size=max_mutations)


def apply_mutations(data: bytes, muts: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for m in muts:
        if m[0] == "set":
            _, off, b = m[:3]
            buf[off : off + len(b)] = b
        elif m[0] == "xor":
            _, off, x = m[:3]
            if off < len(buf):
                buf[off] ^= x
        elif m[0] == "trunc":
            del buf[m[1] :]
    return bytes(buf)


def describe(muts: list[tuple[Any, ...]]) -> str:
    out = []
    for m in muts:
        if m[0] == "set":
            out.append(f"{m[3]} @{m[1]:#x} := {m[2].hex()}")
        elif m[0] == "xor":
            out.append(f"{m[3]} @{m[1]:#x} ^= {m[2]:#04x}")
        else:
            out.append(m[3])
    return "; ".join(out)


def fuzz_examples(default: int) -> int:
    """Examples per fuzz test: ``DISKIMG_FUZZ_EXAMPLES`` wins; the ``thorough`` hypothesis
    profile multiplies the CI default by 25; otherwise ``default`` (the CI budget)."""
    env = os.environ.get("DISKIMG_FUZZ_EXAMPLES")
    if env:
        return int(env)
    from hypothesis import settings

    if settings.get_current_profile_name() == "thorough":
        return default * 25
    return default


# --- known bugs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownBug:
    """A reported bug the fuzzer keeps hitting.  A finding is excused only when the mutated
    image meets ``when`` (the bug's precondition, computed from the bytes) *and* the finding
    text matches ``signature``; each has a strict xfail test in test_known_bugs.py, so the
    entry must be removed when the bug is fixed."""

    id: str
    test: str
    when: Any  # Callable[[bytes], bool]
    signature: str  # regular expression searched in the finding text


def _refcount_offset_above_2_63(data: bytes) -> bool:
    if data[:4] != b"QFI\xfb" or len(data) < 72:
        return False
    rt_off, rt_clusters, cb = _u(data, 48, 8), _u(data, 56, 4), _u(data, 20, 4)
    if not 9 <= cb <= 21:
        return False
    if rt_off >> 63:
        return True
    end = min(len(data), rt_off + min(rt_clusters, 64) * (1 << cb))
    return any(_u(data, o, 8) >> 63 for o in range(rt_off, end - 7, 8))


def _fde_offset_above_2_63(data: bytes) -> bool:
    if data[:4] != b"QFI\xfb" or len(data) < 104 or _u(data, 4, 4) != 3:
        return False
    cb = _u(data, 20, 4)
    if not 9 <= cb <= 21:
        return False
    off = _u(data, 100, 4)
    end = min(len(data), 1 << cb)
    while off >= 104 and off + 8 <= end:
        etype, elen = _u(data, off, 4), _u(data, off + 4, 4)
        if etype == 0:
            break
        if etype == 0x0537BE77 and elen >= 16:
            return (_u(data, off + 8, 8) + _u(data, off + 16, 8)) >> 63 != 0
        off += 8 + elen + (-elen % 8)
    return False


KNOWN_BUGS: list[KnownBug] = []  # B5 and B7 (vmdk) fixed: regression tests now


def unexcused(bugs: list[str], base: BaseImage, data: bytes) -> list[str]:
    """The findings of a report that no known bug explains."""
    import re

    if os.environ.get("DISKIMG_FUZZ_NO_WORKAROUNDS") == "1":
        return list(bugs)
    active = [k for k in KNOWN_BUGS if k.when(data)]
    return [b for b in bugs if not any(re.search(k.signature, b) for k in active)]


# --- worker client ------------------------------------------------------------------------
class Worker:
    """A ``robust_worker.py`` process; :meth:`run` sends one job and returns its report.

    The worker limits itself (``RLIMIT_AS`` = ``mem_mb``, ``RLIMIT_FSIZE``, an alarm of
    ``time_limit`` s per job); the client additionally kills it when no answer comes within
    ``time_limit + grace`` s, and restarts it after any death.
    """

    def __init__(self, mem_mb: int = 1024, time_limit: float = 20.0, grace: float = 20.0,
                 env: dict[str, str] | None = None) -> None:
        self.mem_mb = mem_mb
        self.time_limit = time_limit
        self.grace = grace
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.jobs = 0
        self.restarts = 0

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ if self.env is None else self.env)
        env.pop("DISKIMG_DEBUG", None)
        src = HERE.parents[1] / "src"
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(WORKER), "--mem-mb", str(self.mem_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, start_new_session=True)
        line = self._readline(60)
        if line is None or json.loads(line).get("ready") is not True:
            err = self._kill()
            raise RuntimeError(f"robust_worker did not start: {line!r} {err}")
        return self.proc

    def _readline(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return None
        line = self.proc.stdout.readline()
        return line or None

    def _kill(self) -> str:
        p, self.proc = self.proc, None
        if p is None:
            return ""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        err = p.stderr.read() if p.stderr else ""
        for s in (p.stdin, p.stdout, p.stderr):
            if s:
                s.close()
        return err[-3000:]

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        proc = self.proc if self.proc and self.proc.poll() is None else self._start()
        job = dict(job, time_limit=job.get("time_limit", self.time_limit))
        t0 = time.monotonic()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(job["time_limit"] + self.grace)
        self.jobs += 1
        if line is None:
            try:
                code: int | None = proc.wait(1)  # EOF: it died; give it time to be reaped
            except subprocess.TimeoutExpired:
                code = None
            err = self._kill()
            self.restarts += 1
            what = "hang (no answer, killed)" if code is None else f"worker died (exit {code})"
            return {"bugs": [f"{what} after {time.monotonic() - t0:.1f}s; stderr: {err}"],
                    "steps": [], "elapsed": time.monotonic() - t0}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except Exception:
                pass
        self._kill()


def make_job(base: BaseImage, image: Path, workdir: Path, **extra: Any) -> dict[str, Any]:
    """The job description for running the full pipeline on ``image``."""
    job: dict[str, Any] = {"image": str(image), "workdir": str(workdir), "fmt": base.fmt,
                           "open": base.open_kwargs, "luks": base.luks}
    job.update(extra)
    return job


# --- the fuzz loop -------------------------------------------------------------------------
def outcome(rep: dict) -> str:
    """A short label of how far the pipeline got (for hypothesis statistics)."""
    steps = {s[0]: s[1] for s in rep.get("steps", [])}
    if steps.get("open") != "ok":
        return "open refused"
    if rep.get("info", {}).get("format") == "raw":
        return "probed as raw"
    bad = [k for k in ("info", "read", "map", "check") if steps.get(k) != "ok"]
    return "opened, " + ("all ok" if not bad else "refused: " + ",".join(bad))


def failure_text(base: BaseImage, muts: list, rep: dict, saved: Path | None) -> str:
    lines = [f"base image {base.name}; mutations: {describe(muts)}"]
    if saved:
        lines.append(f"mutated image saved as {saved}")
    lines += ["bugs:"] + [f"  - {b}" for b in rep["bugs"]]
    lines += ["steps:"] + [f"  {s}" for s in rep.get("steps", [])]
    return "\n".join(lines)


def save_failure(img: Path, muts: list) -> Path | None:
    dest = os.environ.get("DISKIMG_FUZZ_SAVE")
    if not dest:
        return None
    import hashlib

    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    data = img.read_bytes()
    out = d / f"{hashlib.sha256(data).hexdigest()[:16]}{img.suffix}"
    out.write_bytes(data)
    out.with_suffix(".txt").write_text(describe(muts) + "\n")
    return out


def fuzz_kind(base: BaseImage, worker: Worker, wd: Path,
              examples: int) -> Counter[str]:
    """Run ``examples`` hypothesis-drawn mutations of ``base`` through ``worker`` (in the
    directory ``wd``); raise AssertionError with a reproducer on the first unexcused
    finding.  Returns how far the pipeline got, counted per label."""
    from hypothesis import HealthCheck, event, given, note, settings

    for f in base.extra:
        shutil.copyfile(f, wd / f.name)
    img = wd / base.path.name
    seen: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(muts=mutation_strategy(base))
    def one(muts: list) -> None:
        data = apply_mutations(base.data, muts)
        img.write_bytes(data)
        rep = worker.run(make_job(base, img, wd))
        rep["bugs"] = unexcused(rep["bugs"], base, data)
        label = outcome(rep)
        seen[label] += 1
        event(label)
        note(describe(muts))
        if rep["bugs"]:
            saved = save_failure(img, muts)
            raise AssertionError(failure_text(base, muts, rep, saved))

    one()
    return seen


# --- building the base images -------------------------------------------------------------
def _qio(path: Path, *cmds: str, luks: bool = False) -> None:
    """qemu-io ``cmds`` on ``path`` (format from its suffix; ``luks``: the LUKS secret)."""
    if luks:
        QEMU.io(f"driver=qcow2,file.filename={path.name},encrypt.key-secret=s0", *cmds,
                image_opts=True, objects=LUKS_SECRET_ARGS[1:], cwd=path.parent)
    else:
        QEMU.io(path.name, *cmds, fmt=path.suffix.lstrip(".") if path.suffix != ".img"
                else "raw", cwd=path.parent)


def _pattern(n: int, seed: int) -> bytes:
    """Compressible but non-trivial data."""
    line = bytes((seed * 7 + i * 13) & 0xFF for i in range(61))
    return (line * (n // len(line) + 1))[:n]


def build_qcow2_bases(d: Path, kinds: list[str] | None = None) -> dict[str, BaseImage]:
    """Small valid qcow2 images of every kind, made by qemu-img/qemu-io and by diskimg."""
    import diskimg

    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, BaseImage] = {}
    want = set(kinds) if kinds else None

    def wanted(k: str) -> bool:
        return want is None or k in want

    def q(kind: str, opts: str, size: str, *io: str, **kw: Any) -> Path:
        p = d / f"{kind}.qcow2"
        QEMU.img("create", "-q", "-f", "qcow2", *kw.get("pre", []), "-o", opts, p.name, size,
                 cwd=d)
        if io:
            _qio(p, *io, luks=kw.get("luks", False))
        return p

    writes = ("write -P 0x11 0 70k", "write -P 0x22 1M 8k", "write -z 1536k 4k",
              "write -P 0x33 1900k 6k", "discard 8k 4k")
    if wanted("qemu-v3"):
        q("qemu-v3", "cluster_size=4096", "2M", *writes)
    if wanted("qemu-v2"):
        q("qemu-v2", "compat=0.10,cluster_size=4096", "2M", *writes)
    if wanted("qemu-v3-64k-rc64"):
        q("qemu-v3-64k-rc64", "refcount_bits=64,lazy_refcounts=on", "3M",
          "write -P 0x44 0 100k", "write -P 0x45 2M 64k", "write -z 1M 64k")
    for comp, cs in (("zlib", "65536"), ("zstd", "4096")):
        kind = f"qemu-compressed-{comp}"
        if wanted(kind):
            raw = d / f"{kind}.src.img"
            raw.write_bytes(_pattern(1 << 20, 3) + bytes(512 << 10) + _pattern(300 << 10, 9))
            p = d / f"{kind}.qcow2"
            QEMU.img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                     f"compression_type={comp},cluster_size={cs}", raw.name, p.name, cwd=d)
            _qio(p, "write -P 0x55 100k 4k")  # a normal cluster among compressed ones
            raw.unlink()
    if wanted("qemu-extl2"):
        q("qemu-extl2", "extended_l2=on,cluster_size=16384", "2M",
          "write -P 0x11 0 3k", "write -P 0x12 20k 1k", "write -z 40k 2k",
          "write -P 0x13 1M 40k", "write -c 128k 16k")
    if wanted("qemu-snapshots"):
        p = q("qemu-snapshots", "cluster_size=4096", "1M", "write -P 0x11 0 40k",
              "write -P 0x12 512k 8k")
        QEMU.img("snapshot", "-c", "first", p.name, cwd=d)
        _qio(p, "write -P 0x21 4k 8k", "write -P 0x22 700k 4k")
        QEMU.img("snapshot", "-c", "second", p.name, cwd=d)
        _qio(p, "write -P 0x31 0 4k")
    if wanted("qemu-backing"):
        b = q("qemu-backing.base", "cluster_size=4096", "1M", "write -P 0xbb 0 1M")
        q("qemu-backing", "cluster_size=4096,backing_file=qemu-backing.base.qcow2,"
          "backing_fmt=qcow2", "1M", "write -P 0x11 4k 8k", "write -z 64k 4k",
          "discard 128k 4k")
        out_extra = {"qemu-backing": [b]}
    else:
        out_extra = {}
    if wanted("qemu-luks"):
        q("qemu-luks", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
          "cluster_size=4096", "512k", "write -P 0x11 0 20k", "write -P 0x12 300k 4k",
          pre=LUKS_SECRET_ARGS, luks=True)
    # made by diskimg
    if wanted("diskimg-v3"):
        p = d / "diskimg-v3.qcow2"
        diskimg.create(p, "qcow2", 2 << 20, options={"cluster_size": 4096})
        with diskimg.open(p, "r+") as img:
            img.write(0, _pattern(70 << 10, 1))
            img.write(1 << 20, b"\x22" * 8192)
            img.write_zeroes(1536 << 10, 4096)
            img.write_compressed(64 << 10 << 1, _pattern(4096, 4))
            img.discard(8192, 4096)
            img.snapshots.create("s1")
            img.write(4096, b"\x33" * 4096)
    if wanted("diskimg-v2-snap"):
        p = d / "diskimg-v2-snap.qcow2"
        diskimg.create(p, "qcow2", 1 << 20, options={"cluster_size": 4096, "compat": "0.10"})
        with diskimg.open(p, "r+") as img:
            img.write(0, _pattern(30 << 10, 2))
            img.snapshots.create("a")
            img.write(8192, b"\x44" * 12288)
            img.write_compressed(512 << 10, _pattern(4096, 5))
    for f in sorted(d.glob("*.qcow2")):
        kind = f.stem
        if kind.endswith(".base") or (want is not None and kind not in want):
            continue
        data = f.read_bytes()
        luks = kind == "qemu-luks"
        out[kind] = BaseImage(kind, f, "qcow2", data, qcow2_layout(data),
                              open_kwargs=LUKS_OPEN if luks else {}, luks=luks,
                              extra=out_extra.get(kind, []))
    return out


def build_vmdk_bases(d: Path) -> dict[str, BaseImage]:
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, BaseImage] = {}
    for sub in ("monolithicSparse", "streamOptimized"):
        p = d / f"{sub}.vmdk"
        raw = d / f"{sub}.src.img"
        raw.write_bytes(_pattern(200 << 10, 1) + bytes(300 << 10) + _pattern(100 << 10, 7)
                        + bytes(424 << 10))
        QEMU.img("convert", "-q", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", raw.name,
                 p.name, cwd=d)
        raw.unlink()
        if sub == "monolithicSparse":
            _qio(p, "write -P 0x66 700k 64k")
        data = p.read_bytes()
        out[sub] = BaseImage(sub, p, "vmdk", data, vmdk_layout(data))
    return out


def qcow2_header(data: bytes) -> dict[str, int]:
    """A few header fields, for tests that patch images."""
    return {name: _u(data, off, n) for name, off, n in _QHDR + _QHDR3}


def patch_be(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
