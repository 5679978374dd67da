"""The convert matrix: seeded random source images converted with random options, by
diskimg and by qemu-img from the same inputs, checked byte for byte.

Sources: qcow2 across its options (cluster sizes 512 B .. 2 MiB, compat 0.10/1.1,
extended_l2, zstd, compressed and zero clusters, discards, internal snapshots, LUKS,
qcow2 or raw backing files shorter or longer than the image, two-level chains), raw, and
vmdk subformats (written by qemu-img); sometimes several sources.  Options: every target
format (qcow2, raw, vmdk subformats), ``-c``, ``-B``/``-F`` and ``-o backing_file`` (the
source's own backing file, a longer copy of it with other data past its end, or an
unrelated image when the source has none), ``-o preallocation=metadata|falloc|full``, LUKS
targets, ``-S 0`` and other values, ``-n`` onto an existing target full of other data,
``-l`` snapshot.

Every case must pass:
- both tools accept it or both refuse it;
- ``qemu-img compare`` of diskimg's target with qemu-img's target, and (unless ``-n`` with
  ``-B``, where qemu-img itself keeps the target's old data) with the source;
- ``qemu-img check`` of diskimg's target (qcow2, vmdk);
- every byte of the target read by diskimg equals the sources read by diskimg;
- for a qcow2 target (where the contract promises qemu's layout) ``qemu-img map
  --output=json`` of diskimg's target equals that of qemu-img's, except with ``-c`` and
  zstd (compressed cluster sizes differ, docs/compatibility.md).

``CONVERT_MATRIX_CASES`` (default 40) and ``CONVERT_MATRIX_SEED`` (default 0) choose the
cases; fuzz/convert_matrix.py runs many more with the same generator.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemukit import QEMU

SECRET_ID = "sec0"
SECRET = "matrix-secret"
OBJECT = ["--object", f"secret,id={SECRET_ID},data={SECRET}"]
LUKS_OPTS = {"encrypt.format": "luks", "encrypt.key-secret": SECRET_ID,
             "encrypt.iter-time": "10"}
K = 1024
M = 1024 * 1024

Run = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass
class Img:
    """An image of a case: path, format, LUKS key needed to open it."""

    path: Path
    fmt: str
    luks: bool = False
    backing: Img | None = None
    size: int = 0
    snapshot: str | None = None

    def opts(self) -> str:
        """qemu's ``--image-opts`` spelling."""
        s = f"driver={self.fmt},file.filename={self.path}"
        return s + (f",encrypt.key-secret={SECRET_ID}" if self.luks else "")


@dataclass
class Case:
    seed: int
    sources: list[Img]
    out_fmt: str
    args: list[str]                 # convert options (without files, --object, image opts)
    target_luks: bool = False
    snapshot: str | None = None
    existing: Img | None = None     # -n: the pre-filled target (copied for each tool)
    backed: bool = False            # -B / -o backing_file
    compress: bool = False
    zstd_target: bool = False
    zeroes_in_ext_l2: bool = False  # zeroes written into an extended-L2 target
    tgt_opts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        srcs = ", ".join(f"{s.fmt}:{s.path.name}" for s in self.sources)
        return (f"seed={self.seed} sources=[{srcs}] -O {self.out_fmt} {' '.join(self.args)}"
                f" luks_target={self.target_luks} -n={self.existing is not None} "
                f"{'; '.join(self.notes)}")


def _io(run: Run, img: Img, cmds: Sequence[str]) -> None:
    if not cmds:
        return
    args: list[str] = [QEMU.qemu_io]
    if img.luks:
        args += [*OBJECT, "--image-opts", img.opts()]
    else:
        args += ["-f", img.fmt, str(img.path)]
    for c in cmds:
        args += ["-c", c]
    res = run(args)
    assert "error" not in res.stdout.lower() and "fail" not in res.stdout.lower(), res.stdout


_LUKS_CACHE: dict[str, Path] = {}


def _create(run: Run, path: Path, fmt: str, size: int, opts: dict[str, str]) -> None:
    """qemu-img create.  A LUKS image costs qemu seconds (its PBKDF2 benchmark), so each
    such create is done once per process and copied."""
    cmd: list[str] = [QEMU.qemu_img, "create", "-q", "-f", fmt]
    if any(k.startswith("encrypt.") for k in opts):
        key = repr((fmt, size, sorted(opts.items())))
        if key not in _LUKS_CACHE:
            if not _LUKS_CACHE:
                cache = Path(tempfile.mkdtemp(prefix="convert-matrix-"))
                atexit.register(shutil.rmtree, cache, True)
                _LUKS_CACHE[""] = cache
            made = _LUKS_CACHE[""] / f"{len(_LUKS_CACHE)}.{fmt}"
            _create_now(run, [*cmd, *OBJECT], made, size, opts)
            _LUKS_CACHE[key] = made
        shutil.copyfile(_LUKS_CACHE[key], path)
        return
    _create_now(run, cmd, path, size, opts)


def _create_now(run: Run, cmd: list[str], path: Path, size: int,
                opts: dict[str, str]) -> None:
    if opts:
        cmd += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    for _ in range(3):
        res = run([*cmd, str(path), str(size)], check=False)
        # qemu's LUKS iteration benchmark fails now and then on a loaded machine
        if res.returncode == 0 or "accurate CPU usage" not in res.stderr:
            break
    assert res.returncode == 0, res.stderr


def _writes(rng: random.Random, size: int, cs: int, *, zero_unmap: bool, compressed: bool,
            count: int) -> list[str]:
    """qemu-io commands: data, zeroes, discards and compressed clusters, at offset 0, the
    last (partial) cluster and random places."""
    out = []
    touched: list[tuple[int, int]] = []
    for i in range(count):
        if i == 0:
            off = 0
        elif i == 1:
            off = max(0, (size - 1) // cs * cs)
        else:
            off = rng.randrange(0, size // 512) * 512
        n = min(size - off, rng.choice([512, 4 * K, 64 * K, 96 * K + 512, 256 * K]))
        if n <= 0:
            continue
        op = rng.random()
        if compressed and op < 0.2:
            o = off // cs * cs
            # whole clusters only, and only clusters nothing touched yet (qemu-io cannot
            # write a compressed cluster over an allocated one)
            if o + cs <= size and all(o + cs <= a or b <= o for a, b in touched):
                out.append(f"write -c -P {rng.randrange(1, 256)} {o} {cs}")
                touched.append((o, o + cs))
                continue
        touched.append((off // cs * cs, -(-(off + n) // cs) * cs))
        if op < 0.55:
            pat = rng.choice([rng.randrange(1, 256), 0]) if rng.random() < 0.15 else \
                rng.randrange(1, 256)
            out.append(f"write -P {pat} {off} {n}")
        elif op < 0.8:
            out.append(f"write -z {'-u ' if zero_unmap and rng.random() < 0.5 else ''}"
                       f"{off} {n}")
        else:
            out.append(f"discard {off} {n}")
    return out


def _size(rng: random.Random) -> int:
    return rng.choice([512 * K, 1 * M, 2 * M, 3 * M]) + rng.choice([0, 0, 512, 64 * K + 3584])


def _raw(rng: random.Random, run: Run, path: Path, size: int) -> Img:
    img = Img(path, "raw", size=size)
    _create(run, path, "raw", size, {})
    _io(run, img, _writes(rng, size, 64 * K, zero_unmap=True, compressed=False,
                          count=rng.randrange(2, 8)))
    return img


def _qcow2(rng: random.Random, run: Run, d: Path, name: str, size: int, *,
           depth: int = 0, luks_ok: bool = True, notes: list[str], focus: str = "") -> Img:
    cs = rng.choice([512, 4 * K, 16 * K, 64 * K, 64 * K, 64 * K, 2 * M])
    compat = rng.choice(["1.1", "1.1", "0.10"])
    opts = {"cluster_size": str(cs), "compat": compat}
    if compat == "1.1":
        if cs >= 16 * K and rng.random() < 0.3:
            opts["extended_l2"] = "on"
        if rng.random() < 0.3:
            opts["compression_type"] = "zstd"
    luks = luks_ok and depth == 0 and rng.random() < 0.06 and focus != "snapshot"
    backing = None
    if not luks and depth < 2 and (rng.random() < (0.45 if depth == 0 else 0.3)
                                   or (focus == "backing" and rng.random() < 0.7)):
        bsize = max(512, size + rng.choice([-1, 1]) * rng.randrange(1, size // 2) // 512 * 512)
        if rng.random() < 0.6:
            backing = _qcow2(rng, run, d, f"{name}.b", bsize, depth=depth + 1, luks_ok=False,
                             notes=notes)
        else:
            backing = _raw(rng, run, d / f"{name}.b.raw", bsize)
        opts["backing_file"] = str(backing.path)
        opts["backing_fmt"] = backing.fmt
    if luks:
        opts.update(LUKS_OPTS)
    notes.append(f"{name}:{','.join(f'{k}={v}' for k, v in opts.items() if k != 'backing_file')}"
                 + (f" backing={backing.fmt}:{backing.size}" if backing else ""))
    path = d / f"{name}.qcow2"
    _create(run, path, "qcow2", size, opts)
    img = Img(path, "qcow2", luks=luks, backing=backing, size=size)
    cmds = _writes(rng, size, cs, zero_unmap=compat == "1.1", compressed=not luks,
                   count=rng.randrange(3, 10))
    if depth == 0 and not luks and (rng.random() < 0.2 or focus == "snapshot"):
        half = len(cmds) // 2
        _io(run, img, cmds[:half])
        run([QEMU.qemu_img, "snapshot", "-c", "snap1", str(path)])
        img.snapshot = "snap1"
        cmds = cmds[half:]
    _io(run, img, cmds)
    return img


def _vmdk(rng: random.Random, run: Run, d: Path, name: str, size: int,
          notes: list[str]) -> Img:
    sub = rng.choice(["monolithicSparse", "monolithicSparse", "streamOptimized",
                      "monolithicFlat", "twoGbMaxExtentSparse"])
    raw = _raw(rng, run, d / f"{name}.tmp.raw", size)
    path = d / f"{name}.vmdk"
    run([QEMU.qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}",
         str(raw.path), str(path)])
    notes.append(f"{name}:vmdk {sub}")
    return Img(path, "vmdk", size=size)


def _source(rng: random.Random, run: Run, d: Path, name: str, notes: list[str],
            single: bool, focus: str) -> Img:
    size = _size(rng)
    r = rng.random()
    if r < 0.7 or focus in ("backing", "snapshot"):
        return _qcow2(rng, run, d, name, size, notes=notes, focus=focus)
    if r < 0.85:
        notes.append(f"{name}:raw")
        return _raw(rng, run, d / f"{name}.raw", size)
    return _vmdk(rng, run, d, name, size // 512 * 512 if single else size, notes)


def _garbage(rng: random.Random, run: Run, img: Img, size: int) -> None:
    """Fill ``img`` with other data (-n targets, unrelated backing files)."""
    _io(run, img, [f"write -P {rng.randrange(1, 256)} 0 {size}"])


FOCI = ["luks-target", "backing", "existing", "sources", "compress", "snapshot", "", ""]


def build_case(seed: int, d: Path, run: Run) -> Case:
    """Build the sources (and any pre-existing target) of case ``seed`` in ``d``."""
    rng = random.Random(seed)
    # every run of consecutive seeds covers each focus: one feature the case must have
    focus = FOCI[seed % len(FOCI)]
    notes: list[str] = [f"focus={focus}"] if focus else []
    nsrc = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
    if focus == "sources":
        nsrc = max(nsrc, 2)
    elif focus in ("backing", "snapshot"):
        nsrc = 1
    sources = [_source(rng, run, d, f"s{i}", notes, nsrc == 1, focus) for i in range(nsrc)]
    total = sum(s.size for s in sources)
    out_fmt = rng.choice(["qcow2"] * 11 + ["raw"] * 4 + ["vmdk"] * 5)
    if focus in ("luks-target", "backing", "compress"):
        out_fmt = "qcow2"
    args: list[str] = []
    tgt_opts: dict[str, str] = {}
    case = Case(seed, sources, out_fmt, args, notes=notes, tgt_opts=tgt_opts)
    src = sources[0]
    if out_fmt == "qcow2":
        cs = rng.choice([512, 4 * K, 64 * K, 64 * K, 64 * K, 2 * M])
        compat = rng.choice(["1.1", "1.1", "1.1", "0.10"])
        tgt_opts.update(cluster_size=str(cs), compat=compat)
        if compat == "1.1":
            if cs >= 16 * K and rng.random() < 0.25:
                tgt_opts["extended_l2"] = "on"
            if rng.random() < 0.25:
                tgt_opts["compression_type"] = "zstd"
                case.zstd_target = True
            if rng.random() < 0.15:
                tgt_opts["lazy_refcounts"] = "on"
        prealloc = rng.choice(["off"] * 4 + ["metadata", "metadata", "falloc", "full"])
        case.target_luks = rng.random() < 0.06 or focus == "luks-target"
        if focus == "luks-target":
            prealloc = rng.choice(["off", "metadata", "metadata", "falloc", "full"])
        elif focus == "compress":
            prealloc = "off"
        if prealloc != "off":
            tgt_opts["preallocation"] = prealloc
        if case.target_luks:
            tgt_opts.update(LUKS_OPTS)
        case.zeroes_in_ext_l2 = "extended_l2" in tgt_opts and case.target_luks and \
            prealloc != "off"
    elif out_fmt == "raw":
        prealloc = rng.choice(["off", "off", "falloc", "full"])
        if prealloc != "off":
            tgt_opts["preallocation"] = prealloc
    else:
        tgt_opts["subformat"] = rng.choice(["monolithicSparse", "monolithicSparse",
                                            "streamOptimized", "monolithicFlat",
                                            "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
    # -B / -o backing_file: qcow2 targets of one source
    if out_fmt == "qcow2" and nsrc == 1 and not case.target_luks and not src.luks and \
            (rng.random() < (0.5 if src.backing is not None else 0.15) or focus == "backing"):
        if src.backing is not None and rng.random() < 0.7:
            tb = src.backing
            case.notes.append("-B: the source's backing file")
        elif src.backing is not None:
            # a copy of the source's backing file, longer, with other data past its end
            tb = Img(d / "tb.qcow2", "qcow2", size=src.backing.size + 256 * K)
            run([QEMU.qemu_img, "convert", "-f", src.backing.fmt, "-O", "qcow2",
                 str(src.backing.path), str(tb.path)])
            run([QEMU.qemu_img, "resize", "-q", "-f", "qcow2", str(tb.path),
                 str(tb.size)])
            _io(run, tb, [f"write -P 0xbb {src.backing.size} {256 * K}"])
            case.notes.append("-B: a longer copy of the source's backing file")
        else:
            tb = Img(d / "tb.qcow2", "qcow2", size=src.size)
            _create(run, tb.path, "qcow2", tb.size, {})
            _garbage(rng, run, tb, tb.size)
            case.notes.append("-B: an unrelated image (source without backing)")
        case.backed = True
        case.zeroes_in_ext_l2 = "extended_l2" in tgt_opts
        if rng.random() < 0.5:
            args += ["-B", str(tb.path), "-F", tb.fmt]
        else:
            tgt_opts.update(backing_file=str(tb.path), backing_fmt=tb.fmt)
    compressible = (out_fmt == "qcow2" and not case.target_luks) or \
        (out_fmt == "vmdk" and "Flat" not in tgt_opts["subformat"])
    if compressible and (rng.random() < (0.5 if case.backed else 0.35) or focus == "compress"):
        case.compress = True
        args.append("-c")
    sparse = rng.choice([None, None, None, "0", "512", "4k", "64k"])
    if sparse is not None:
        args += ["-S", sparse]
    if nsrc == 1 and src.snapshot is not None and (rng.random() < 0.6 or focus == "snapshot"):
        case.snapshot = src.snapshot
        args += ["-l", src.snapshot]
    stream = tgt_opts.get("subformat") == "streamOptimized"
    creatable = not (case.backed and "preallocation" in tgt_opts
                     and "extended_l2" not in tgt_opts)  # qemu refuses to create it
    if not case.compress and not stream and creatable and \
            (rng.random() < 0.25 or focus == "existing"):
        # -n: the target exists (created like the new one would be) and holds other data
        ex = Img(d / f"existing.{out_fmt}", out_fmt, luks=case.target_luks, size=total)
        _create(run, ex.path, out_fmt, total, tgt_opts)
        _garbage(rng, run, ex, total)
        case.existing = ex
        case.zeroes_in_ext_l2 = "extended_l2" in tgt_opts
        args.append("-n")
    elif tgt_opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in tgt_opts.items())]
    return case


def _convert_cmd(prog: list[str], case: Case, target: Path) -> list[str]:
    cmd = [*prog, "convert", *OBJECT]
    luks_src = any(s.luks for s in case.sources)
    if luks_src:
        cmd.append("--image-opts")
    tgt = Img(target, case.out_fmt, luks=case.target_luks)
    if case.existing is not None and case.target_luks:
        cmd.append("--target-image-opts")  # the format is its driver (-O is refused)
    else:
        cmd += ["-O", case.out_fmt]
    cmd += case.args
    cmd += [s.opts() if luks_src else str(s.path) for s in case.sources]
    cmd.append(tgt.opts() if case.existing is not None and case.target_luks else str(target))
    return cmd


def _open(img: Img) -> Any:
    import diskimg

    opts = {"encrypt.key-secret": SECRET_ID} if img.luks else None
    return diskimg.open(img.path, "r", img.fmt, secrets={SECRET_ID: SECRET.encode()},
                        options=opts, force_share=True)


def _read_all(img: Img, snapshot: str | None = None) -> bytes:
    with _open(img) as dev:
        if snapshot is None:
            return bytes(dev.read(0, dev.size))
        with dev.snapshot_view(name=snapshot) as view:
            return bytes(view.read(0, view.size))


def _first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for p in range(0, n, 4096):
        if a[p : p + 4096] != b[p : p + 4096]:
            return p + next(i for i in range(4096) if a[p + i] != b[p + i])
    return n


def _backing_end(case: Case) -> int:
    """The size of the one source's backing file (0: none)."""
    b = case.sources[0].backing
    return b.size if b is not None else 0


def _past_short_backing(case: Case, qemu_t: Img, diskimg_t: Img) -> bool:
    """Whether the two targets of a ``-B`` case differ only where qemu-img's is wrong.

    qemu-img convert -B reads the source's own layer with ``bdrv_block_status``, which
    does not cut an unallocated run at the end of a shorter backing file: a run that
    starts before that end is left to the target's backing file (or, with ``-n``, to
    what the target held) past the end too, where the source reads zeros.  diskimg
    writes those zeros.  True when every byte where the targets differ lies past the
    end of the source's backing file and diskimg's byte there is the source's."""
    if not case.backed or len(case.sources) != 1:
        return False
    end = _backing_end(case)
    if not 0 < end < case.sources[0].size:
        return False
    q, d = _read_all(qemu_t), _read_all(diskimg_t)
    src = _read_all(case.sources[0], case.snapshot)
    return q[:end] == d[:end] and d[end:] == src[end:] and len(q) == len(d)


def run_case(seed: int, d: Path, run: Run) -> tuple[Case, list[str]]:
    """Build and run case ``seed`` in ``d``: the case and the problems found (empty: it
    passed)."""
    case = build_case(seed, d, run)
    qimg = QEMU.qemu_img
    ext = case.out_fmt
    qt, dt = d / f"qemu-target.{ext}", d / f"diskimg-target.{ext}"
    if case.existing is not None:
        shutil.copyfile(case.existing.path, qt)
        shutil.copyfile(case.existing.path, dt)
    for _ in range(3):
        q = run(_convert_cmd([qimg], case, qt), check=False)
        # qemu's LUKS iteration benchmark fails now and then on a loaded machine
        if "accurate CPU usage" not in q.stderr:
            break
    r = run(_convert_cmd([sys.executable, "-m", "diskimg"], case, dt), check=False)
    what = case.describe()
    if q.returncode != 0:
        if r.returncode == 0:
            return case, [f"qemu-img refused ({q.stderr.strip()}) but diskimg converted: "
                          f"{what}"]
        return case, []
    if r.returncode != 0:
        return case, [f"diskimg failed: {r.stderr.strip()[-500:]}: {what}"]
    problems: list[str] = []
    qimg_t = Img(qt, case.out_fmt, luks=case.target_luks)
    dimg_t = Img(dt, case.out_fmt, luks=case.target_luks)
    # 1. the same guest contents as qemu-img's own target (but where qemu's -B artifact
    # leaves bytes the source does not read, see _past_short_backing)
    c = run([qimg, "compare", *OBJECT, "--image-opts", qimg_t.opts(), dimg_t.opts()],
            check=False)
    qemu_artifact = c.returncode != 0 and _past_short_backing(case, qimg_t, dimg_t)
    if c.returncode != 0 and not qemu_artifact:
        problems.append(f"differs from qemu-img's target: {c.stdout.strip()} "
                        f"{c.stderr.strip()}")
    # 2. the same guest contents as the source (qemu-img reading both)
    equal_to_source = not (case.existing is not None and case.backed)
    if equal_to_source and len(case.sources) == 1 and case.snapshot is None:
        c = run([qimg, "compare", *OBJECT, "--image-opts", case.sources[0].opts(),
                 dimg_t.opts()], check=False)
        if c.returncode != 0:
            problems.append(f"qemu-img compare with the source: {c.stdout.strip()} "
                            f"{c.stderr.strip()}")
    # 3. qemu-img check of the target
    if case.out_fmt != "raw":
        c = run([qimg, "check", *OBJECT, "--image-opts", dimg_t.opts()], check=False)
        if c.returncode != 0 or "No errors were found" not in c.stdout:
            problems.append(f"qemu-img check: {c.stdout.strip()} {c.stderr.strip()}")
    # 4. every byte, read by diskimg
    got = _read_all(dimg_t)
    if equal_to_source:
        want = b"".join(_read_all(s, case.snapshot) for s in case.sources)
    else:
        want = _read_all(qimg_t)
        if qemu_artifact:  # the source's zeros past its backing file's end
            end = _backing_end(case)
            want = want[:end] + _read_all(case.sources[0], case.snapshot)[end:]
    if got[: len(want)] != want or any(got[len(want):]):
        problems.append(f"diskimg reads the target differently from the source from byte "
                        f"{_first_diff(got, want)} (target {len(got)} bytes, source "
                        f"{len(want)})")
    # 5. qemu's layout where the contract promises it.  Not yet: zstd (docs), zeroes
    # written inside a cluster of an extended-L2 image (qemu sets subcluster zero bits,
    # diskimg writes zeros: reported, qcow2 write_zeroes), streamOptimized with -S 0
    # (diskimg's stream writer drops grains of zeros: reported)
    stream = case.tgt_opts.get("subformat") == "streamOptimized"
    if qemu_artifact:  # (qemu's map differs where its bytes do)
        pass
    elif (case.out_fmt == "qcow2" and not (case.compress and case.zstd_target)
            and not case.zeroes_in_ext_l2) or \
            (case.out_fmt == "vmdk" and not (stream and "-S" in case.args
                                             and case.args[case.args.index("-S") + 1] == "0")):
        maps = []
        for t in (qimg_t, dimg_t):
            m = run([qimg, "map", "--output=json", *OBJECT, "--image-opts", t.opts()])
            maps.append(json.loads(m.stdout))
        if maps[0] != maps[1]:
            problems.append(f"map differs from qemu-img's target:\n qemu:    {maps[0]}\n "
                            f"diskimg: {maps[1]}")
    return case, [f"{p}\n  case: {what}" for p in problems]


CASES = int(os.environ.get("CONVERT_MATRIX_CASES", "40"))
SEED = int(os.environ.get("CONVERT_MATRIX_SEED", "0"))


@pytest.mark.qemu
@pytest.mark.parametrize("seed", range(SEED, SEED + CASES))
def test_convert_matrix(seed: int, tmp_path: Path, run: Run) -> None:
    case, problems = run_case(seed, tmp_path, run)
    assert not problems, "\n".join(problems)


# --- the bugs the matrix was built for, as plain regression tests -----------------------

def _both(run: Run, d: Path, args: list[str], src: Path, name: str,
          obj: bool = False) -> tuple[Path, Path]:
    """Convert ``src`` with ``args`` by qemu-img and by diskimg: (qemu's, diskimg's)."""
    out = []
    for prog in ([QEMU.qemu_img], [sys.executable, "-m", "diskimg"]):
        t = d / f"{'q' if len(prog) == 1 else 'd'}-{name}"
        run([*prog, "convert", *(OBJECT if obj else []), *args, str(src), str(t)])
        out.append(t)
    return out[0], out[1]


def _map(run: Run, img: Img) -> Any:
    return json.loads(run([QEMU.qemu_img, "map", "--output=json", *OBJECT,
                           "--image-opts", img.opts()]).stdout)


def _same(run: Run, a: Img, b: Img) -> None:
    res = run([QEMU.qemu_img, "compare", *OBJECT, "--image-opts", a.opts(), b.opts()],
              check=False)
    assert res.returncode == 0, f"{a.path.name} vs {b.path.name}: {res.stdout}{res.stderr}"


@pytest.mark.qemu
@pytest.mark.parametrize("spelling", ["-B", "-o"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("src_backed", [True, False])
def test_convert_backing_target(tmp_path: Path, run: Run, spelling: str, compress: bool,
                                src_backed: bool) -> None:
    """Issue 15 bug 7: ``convert [-c] -B``.  Zero clusters of the source must read as zeros
    in the target (not as the target's backing file), ranges the source leaves to its
    backing file are left to the target's, and a source without a backing file is copied
    whole (its unallocated ranges are zeros over the target's backing file)."""
    base = Img(tmp_path / "base.qcow2", "qcow2", size=M)
    _create(run, base.path, "qcow2", M, {})
    _io(run, base, [f"write -P 0xaa 0 {M}"])
    src = Img(tmp_path / "src.qcow2", "qcow2", size=M)
    _create(run, src.path, "qcow2", M,
            {"backing_file": str(base.path), "backing_fmt": "qcow2"} if src_backed else {})
    _io(run, src, ["write -z 0 64k", "write -P 0x11 128k 64k", "write -P 0 256k 64k",
                   "write -z 400k 4k", "write -P 0x22 1020k 4k"])
    args = ["-O", "qcow2", *(["-c"] if compress else [])]
    args += (["-B", str(base.path), "-F", "qcow2"] if spelling == "-B" else
             ["-o", f"backing_file={base.path},backing_fmt=qcow2"])
    q, d = _both(run, tmp_path, args, src.path, "t.qcow2")
    qi, di = Img(q, "qcow2"), Img(d, "qcow2")
    _same(run, src, di)
    _same(run, qi, di)
    assert _map(run, di) == _map(run, qi)
    want = _read_all(src)
    assert _read_all(di) == want
    assert want[:65536] == bytes(65536)  # the zero cluster over 0xaa in the backing file
    res = run([QEMU.qemu_img, "check", str(d)])
    assert "No errors were found" in res.stdout


@pytest.mark.qemu
@pytest.mark.parametrize("existing", [False, True])
def test_convert_b_past_a_shorter_backing_file(tmp_path: Path, run: Run,
                                               existing: bool) -> None:
    """Matrix seed 19018: ``convert -B`` of a source whose backing file ends inside an
    unallocated run of the source's own layer.  Past that end the source reads zeros, and
    so must the target: diskimg writes them, over the target's longer backing file
    (0xbb there) or, with ``-n``, over what the target held (0x4b).  qemu-img leaves
    them (its status run is not cut at the end: see ``_past_short_backing``); before the
    end both leave the run to the target's backing file."""
    base = Img(tmp_path / "base.qcow2", "qcow2", size=M + 4096)
    _create(run, base.path, "qcow2", base.size, {})
    _io(run, base, [f"write -P 0x11 0 {base.size}"])
    src = Img(tmp_path / "src.qcow2", "qcow2", size=2 * M, backing=base)
    _create(run, src.path, "qcow2", src.size,
            {"backing_file": str(base.path), "backing_fmt": "qcow2"})
    _io(run, src, ["write -P 0x22 0 64k", f"write -P 0x33 {2 * M - 65536} 64k"])
    tb = Img(tmp_path / "tb.qcow2", "qcow2", size=2 * M)
    _create(run, tb.path, "qcow2", tb.size, {})
    _io(run, tb, [f"write -P 0x11 0 {base.size}",
                  f"write -P 0xbb {base.size} {tb.size - base.size}"])
    args = ["-O", "qcow2", "-B", str(tb.path), "-F", "qcow2"]
    t = Img(tmp_path / "d-t.qcow2", "qcow2")
    if existing:
        _create(run, t.path, "qcow2", src.size, {})
        _io(run, t, [f"write -P 0x4b 0 {src.size}"])
        args.append("-n")
    run([sys.executable, "-m", "diskimg", "convert", *args, str(src.path), str(t.path)])
    got, want = _read_all(t), _read_all(src)
    assert want[base.size : 2 * M - 65536] == bytes(2 * M - 65536 - base.size)
    assert got[base.size :] == want[base.size :]
    assert got[:65536] == want[:65536]
    # before the end the run is left to the target: its backing file's bytes, or with
    # -n what it held
    assert set(got[65536 : base.size]) == ({0x4b} if existing else {0x11})
    res = run([QEMU.qemu_img, "check", str(t.path)])
    assert "No errors were found" in res.stdout


@pytest.mark.qemu
def test_convert_c_b_backing_end_inside_a_cluster(tmp_path: Path, run: Run) -> None:
    """Matrix seed 19073: ``convert -c -B`` where the target's backing file ends inside a
    cluster.  qemu cuts its status runs at that end, so that cluster is no whole run of
    one kind: it is read (zeros) and written as zeroes, a zero cluster, as in qemu's
    target (not left to the backing file)."""
    base = Img(tmp_path / "base.qcow2", "qcow2", size=M + 4608)
    _create(run, base.path, "qcow2", base.size, {"cluster_size": str(2 * M)})
    _io(run, base, ["write -P 0x44 64k 64k"])
    src = Img(tmp_path / "src.qcow2", "qcow2", size=2 * M, backing=base)
    _create(run, src.path, "qcow2", src.size,
            {"backing_file": str(base.path), "backing_fmt": "qcow2"})
    _io(run, src, ["write -P 0x55 512k 64k"])
    args = ["-O", "qcow2", "-c", "-B", str(base.path), "-F", "qcow2"]
    q, d = _both(run, tmp_path, args, src.path, "t.qcow2")
    qi, di = Img(q, "qcow2"), Img(d, "qcow2")
    _same(run, src, di)
    assert _map(run, di) == _map(run, qi)
    assert {"start": M, "length": 65536, "depth": 0, "present": True, "zero": True,
            "data": False} in _map(run, di)
    res = run([QEMU.qemu_img, "check", str(d)])
    assert "No errors were found" in res.stdout


@pytest.mark.qemu
def test_convert_luks_preallocated_target_zero_runs(tmp_path: Path, run: Run) -> None:
    """Issue 15 bug 8: a new LUKS qcow2 with preallocation=metadata does not read as zeros
    (its preallocated clusters decrypt to garbage), so the zero runs of the source must be
    written, as qemu-img does (its has-zero-init rule), with qemu's layout."""
    src = Img(tmp_path / "src.qcow2", "qcow2", size=M)
    _create(run, src.path, "qcow2", M, {})
    _io(run, src, ["write -P 0x11 128k 64k", "write -z 256k 64k", "write -P 0 512k 4k"])
    opts = ",".join(f"{k}={v}" for k, v in {**LUKS_OPTS, "preallocation": "metadata"}.items())
    q, d = _both(run, tmp_path, ["-O", "qcow2", "-o", opts], src.path, "t.qcow2", obj=True)
    qi, di = Img(q, "qcow2", luks=True), Img(d, "qcow2", luks=True)
    _same(run, src, di)
    _same(run, qi, di)
    assert _map(run, di) == _map(run, qi)
    assert _read_all(di) == _read_all(src)


@pytest.mark.qemu
def test_convert_compress_refuses_preallocation(tmp_path: Path, run: Run) -> None:
    """qemu-img refuses ``-c`` with preallocation before creating anything."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * 65536)
    for prog in ([QEMU.qemu_img], [sys.executable, "-m", "diskimg"]):
        res = run([*prog, "convert", "-c", "-O", "qcow2", "-o", "preallocation=metadata",
                   str(src), str(tmp_path / "t.qcow2")], check=1)
        assert "Compression and preallocation not supported at the same time" in res.stderr
        assert not (tmp_path / "t.qcow2").exists()


@pytest.mark.qemu
@pytest.mark.parametrize("sub", ["monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized",
                                 "monolithicFlat"])
def test_convert_compress_vmdk(tmp_path: Path, run: Run, sub: str) -> None:
    """qemu-img accepts ``-c`` for vmdk (ordinary writes, whole grains; a streamOptimized
    extent compresses them anyway) and refuses it for a flat extent (no cluster size)."""
    src = Img(tmp_path / "src.qcow2", "qcow2", size=M)
    _create(run, src.path, "qcow2", M, {})
    _io(run, src, ["write -P 0x11 0 64k", "write -z 128k 64k", "write -P 0x22 200k 8k",
                   "write -P 0 512k 64k", "write -P 0x33 1020k 4k"])
    args = ["convert", "-c", "-O", "vmdk", "-o", f"subformat={sub}", str(src.path)]
    q, d = tmp_path / "q.vmdk", tmp_path / "d.vmdk"
    rq = run([QEMU.qemu_img, *args, str(q)], check=False)
    rd = run([sys.executable, "-m", "diskimg", *args, str(d)], check=False)
    if sub == "monolithicFlat":
        assert rq.returncode == rd.returncode == 1
        assert "invalid cluster size" in rq.stderr and "invalid cluster size" in rd.stderr
        return
    assert rq.returncode == 0 and rd.returncode == 0, rd.stderr
    qi, di = Img(q, "vmdk"), Img(d, "vmdk")
    _same(run, src, di)
    assert _map(run, di) == _map(run, qi)
    assert _read_all(di) == _read_all(src)
    assert "No errors were found" in run([QEMU.qemu_img, "check", str(d)]).stdout


@pytest.mark.qemu
def test_convert_backing_with_preallocation_needs_extended_l2(tmp_path: Path, run: Run) -> None:
    """qemu refuses a qcow2 with a backing file and preallocation but without extended L2
    (its preallocated clusters would hide the backing file), before creating anything;
    with extended_l2=on both tools convert, to the same contents."""
    base = Img(tmp_path / "base.qcow2", "qcow2", size=M)
    _create(run, base.path, "qcow2", M, {})
    _io(run, base, [f"write -P 0xaa 0 {M}"])
    src = Img(tmp_path / "src.qcow2", "qcow2", size=M)
    _create(run, src.path, "qcow2", M, {"backing_file": str(base.path), "backing_fmt": "qcow2"})
    _io(run, src, ["write -P 0x11 64k 64k", "write -z 256k 4k"])
    for prog in ([QEMU.qemu_img], [sys.executable, "-m", "diskimg"]):
        t = tmp_path / "t.qcow2"
        res = run([*prog, "convert", "-O", "qcow2", "-B", str(base.path), "-F", "qcow2",
                   "-o", "preallocation=metadata", str(src.path), str(t)], check=1)
        assert "Backing file and preallocation can only be used at the same time if " \
            "extended_l2 is on" in res.stderr
        assert not t.exists()
    args = ["-O", "qcow2", "-B", str(base.path), "-F", "qcow2",
            "-o", "preallocation=metadata,extended_l2=on"]
    q, d = _both(run, tmp_path, args, src.path, "x.qcow2")
    _same(run, src, Img(d, "qcow2"))
    _same(run, Img(q, "qcow2"), Img(d, "qcow2"))
    # (not the map yet: zeroes inside an extended-L2 cluster, see run_case)
    assert _read_all(Img(d, "qcow2")) == _read_all(src)
    assert "No errors were found" in run([QEMU.qemu_img, "check", str(d)]).stdout


@pytest.mark.qemu
@pytest.mark.parametrize("cluster_size", [512, 1024])
@pytest.mark.parametrize("prealloc", ["falloc", "full"])
def test_create_luks_preallocated_small_clusters(tmp_path: Path, run: Run, cluster_size: int,
                                                 prealloc: str) -> None:
    """Found by the matrix: a LUKS header spans several refcount blocks at small cluster
    sizes, and ``preallocation=falloc|full`` rebuilt the refcounts from the first block
    only (3788 clusters with refcount 0 but referenced at 512 bytes).  Now the image is
    clean and laid out as qemu-img lays it out (same file size and map)."""
    opts = ",".join(f"{k}={v}" for k, v in {**LUKS_OPTS, "cluster_size": cluster_size,
                                            "preallocation": prealloc}.items())
    q, d = tmp_path / "q.qcow2", tmp_path / "d.qcow2"
    run([sys.executable, "-m", "diskimg", "create", "-q", "-f", "qcow2", *OBJECT, "-o", opts,
         d, str(M)])
    _create(run, q, "qcow2", M, {**LUKS_OPTS, "cluster_size": str(cluster_size),
                                 "preallocation": prealloc})
    di, qi = Img(d, "qcow2", luks=True), Img(q, "qcow2", luks=True)
    chk = run([QEMU.qemu_img, "check", *OBJECT, "--image-opts", di.opts()], check=False)
    assert chk.returncode == 0 and "No errors were found" in chk.stdout, chk.stdout[-500:]
    assert d.stat().st_size == q.stat().st_size
    assert _map(run, di) == _map(run, qi)
