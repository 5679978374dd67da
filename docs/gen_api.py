"""Regenerate docs/reference/api.md from ``diskimg.__all__`` and the docstrings.

    python docs/gen_api.py            # rewrite docs/reference/api.md
    python docs/gen_api.py --check    # exit 1 if the committed file is out of date

Every public function, class, method and property listed here must have a docstring: a
missing one is printed on stderr (and at the end of the page) and makes both modes exit 1;
tests/docs/test_generated.py runs ``--check``.  Only the standard library is used
(``inspect``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from gen_common import run

OUT = Path(__file__).resolve().parent / "reference" / "api.md"

# (module, names, heading, intro); names None = the module's __all__
SECTIONS: list[tuple[str, list[str] | None, str, str]] = [
    ("diskimg", None, "`diskimg`",
     "Everything re-exported from the top-level package (`diskimg.__all__`)."),
    ("diskimg.qcow2.image", ["Qcow2Image"], "qcow2 images (`diskimg.qcow2`)",
     "What `diskimg.open()` returns for a qcow2 file: a `BlockDevice` plus snapshots, "
     "compressed writes, resize and check."),
    ("diskimg.qcow2.snapshot", ["SnapshotTable", "Snapshot", "SnapshotNotFoundError"],
     "Internal snapshots (`img.snapshots`)", "`Qcow2Image.snapshots` is a `SnapshotTable`."),
    ("diskimg.qcow2.check", ["CheckResult"], "Check results",
     "What `img.check()` returns; `to_json()` is `check --output=json`."),
    ("diskimg.vmdk", ["create_vmdk", "write_stream_optimized", "open_vmdk", "VmdkImage"],
     "vmdk images (`diskimg.vmdk`)",
     "What `diskimg.open()` returns for a vmdk (`VmdkImage`), and the vmdk writers behind "
     "`diskimg.create()` and `convert -O vmdk`."),
    ("diskimg.hostio.remote", ["open_fsspec", "open_fsspec_sink", "ObjectSink",
                               "part_size", "is_fsspec_url"],
     "Object storage (`diskimg.hostio.remote`)",
     "Sources and sinks in any fsspec store (`s3://`, `gs://`, `az://`, `memory://` ...; "
     "the `diskimg[remote]` extra): `diskimg.open(url)` reads through `open_fsspec`, "
     "`diskimg.convert(src, url)` writes through `open_fsspec_sink`; see "
     "[object storage](../howto/object-storage.md)."),
    ("diskimg.hostio.s3", ["open_s3"], "diskimg's own S3 client (`diskimg.hostio.s3`)",
     "`s3://` without fsspec, s3fs or botocore: which URLs it serves (the rule of "
     "`diskimg.hostio.s3conf.native_config`), with which endpoint and credentials: see "
     "[object storage](../howto/object-storage.md#which-client-serves-s3)."),
    ("diskimg.hostio.url_sink", ["open_url_sink"], "URL targets (`diskimg.hostio.url_sink`)",
     "The sink behind `diskimg.convert(src, url)`: the native S3 client's `S3Sink` or "
     "fsspec's `ObjectSink`, by the same rule as for reading."),
    ("diskimg.hostio.sink", ["Sink", "CountingSink", "SinkError", "open_sink"],
     "Sinks (`diskimg.hostio.sink`)",
     "Append-only destinations `convert` streams into: stdout, pipes, sockets, file "
     "objects; see [stream to a pipe](../howto/stream-to-pipe.md)."),
    ("diskimg.pool", None, "`diskimg.pool`",
     "libvirt-compatible directory pools; see [pools.md](../pools.md)."),
    ("diskimg.nbd.server", ["Server", "listen_tcp", "listen_unix"],
     "NBD server (`diskimg.nbd`)",
     "What `diskimg nbd` runs: a threaded NBD server over any `BlockDevice`; see the "
     "[NBD how-to](../howto/nbd.md).  `diskimg.nbd.protocol` is the wire codec."),
    ("diskimg.nbd.export", ["Export"], "NBD exports",
     "One export: the device, its name, and what clients may do with it."),
    ("diskimg.nbd.client_host", ["open_nbd", "NbdHost"], "NBD exports as images "
     "(`diskimg.nbd.client_host`)",
     "What `diskimg.open(\"nbd://...\")` opens an NBD export with; see "
     "[the how-to](../howto/nbd-client.md)."),
    ("diskimg.nbd.client", ["NbdClient"], "The NBD client (`diskimg.nbd.client`)",
     "One connection to one export: the commands of the NBD protocol."),
    ("diskimg.nbd.url", ["parse", "NbdAddress"], "NBD URLs (`diskimg.nbd.url`)",
     "`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://` as the NBD URI standard "
     "defines them."),
]

missing: list[str] = []


def _doc(obj: Any, qual: str) -> str:
    d = inspect.getdoc(obj)
    if not d:
        missing.append(qual)
        return "*(no docstring)*"
    return d


class _Ann:
    """An annotation shown as written (they are strings under postponed evaluation)."""

    def __init__(self, text: Any) -> None:
        self.text = text if isinstance(text, str) else inspect.formatannotation(text)

    def __repr__(self) -> str:
        return str(self.text)


def _sig(obj: Any, name: str) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    E = inspect.Parameter.empty
    params = [p.replace(annotation=_Ann(p.annotation)) if p.annotation is not E else p
              for p in sig.parameters.values()]
    ret = sig.return_annotation
    sig = sig.replace(parameters=params,
                      return_annotation=_Ann(ret) if ret is not inspect.Signature.empty else ret)
    return f"{name}{sig}"


def _public_members(cls: type) -> list[tuple[str, Any]]:
    out = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") and name not in ("__init__",):
            continue
        if name == "__init__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            out.append((name, member))
    return out


def _is_error(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def render_class(modname: str, name: str, cls: type) -> list[str]:
    lines = [f"### `{name}`", ""]
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    init = cls.__dict__.get("__init__")
    sig = _sig(init, name).replace("(self, ", "(").replace("(self)", "()") if init else name
    lines += ["```python", f"class {sig}" + (f"  # bases: {', '.join(bases)}" if bases else ""),
              "```", "", _doc(cls, f"{modname}.{name}"), ""]
    for mname, member in _public_members(cls):
        qual = f"{modname}.{name}.{mname}"
        if isinstance(member, property):
            lines += [f"- **`{mname}`** (property): " + _doc(member.fget, qual).replace("\n", " ")]
        else:
            s = _sig(member, mname).replace("(self, ", "(").replace("(self)", "()")
            s = s.replace("(cls, ", "(").replace("(cls)", "()")
            lines += [f"- **`{s}`**", "", "  " + _doc(member, qual).replace("\n", "\n  "), ""]
    if lines[-1] != "":
        lines.append("")
    return lines


def render_errors(modname: str, errors: list[tuple[str, type]]) -> list[str]:
    lines = ["### Exceptions", "", "```text"]
    names = {n for n, _ in errors}

    def walk(cls: type, depth: int) -> None:
        bases = [b.__name__ for b in cls.__bases__ if b.__name__ not in names]
        extra = f" ({', '.join(bases)})" if bases else ""
        lines.append("    " * depth + cls.__name__ + extra)
        for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
            if sub.__name__ in names and sub.__module__.startswith("diskimg"):
                walk(sub, depth + 1)

    roots = [c for n, c in errors if not any(b.__name__ in names for b in c.__bases__)]
    for r in roots:
        walk(r, 0)
    lines += ["```", ""]
    for n, c in errors:
        lines.append(f"- **`{n}`**: " + _doc(c, f"{modname}.{n}").replace("\n", " "))
    lines.append("")
    return lines


def render_module(mod: ModuleType, names: list[str]) -> list[str]:
    lines: list[str] = []
    funcs = [(n, getattr(mod, n)) for n in names if inspect.isfunction(getattr(mod, n))]
    classes = [(n, getattr(mod, n)) for n in names
               if inspect.isclass(getattr(mod, n)) and not _is_error(getattr(mod, n))]
    errors = [(n, getattr(mod, n)) for n in names if _is_error(getattr(mod, n))]
    others = [(n, getattr(mod, n)) for n in names
              if not inspect.isfunction(getattr(mod, n)) and not inspect.isclass(getattr(mod, n))]
    for n, f in funcs:
        lines += [f"### `{n}()`", "", "```python", f"def {_sig(f, n)}", "```", "",
                  _doc(f, f"{mod.__name__}.{n}"), ""]
    for n, c in classes:
        lines += render_class(mod.__name__, n, c)
    if errors:
        lines += render_errors(mod.__name__, errors)
    if others:
        lines += ["### Constants", ""]
        lines += [f"- `{n}` = `{v!r}`" for n, v in others]
        lines.append("")
    return lines


def generate() -> str:
    missing.clear()
    lines = ["# Python API reference", "",
             "<!-- generated by docs/gen_api.py from the docstrings; do not edit by hand -->",
             "",
             "Offsets and lengths are bytes. Paths may be `str` or `os.PathLike`. Every error "
             "diskimg raises on purpose is a `diskimg.DiskImgError`; see the exception "
             "hierarchy below. The [tutorial](../tutorial.md) shows the API in use.", ""]
    for modname, names, heading, intro in SECTIONS:
        mod = importlib.import_module(modname)
        names = list(names if names is not None else getattr(mod, "__all__", []))
        names = [n for n in names if not n.startswith("__") and hasattr(mod, n)]
        lines += [f"## {heading}", "", intro, ""]
        lines += render_module(mod, names)
    if missing:
        lines += ["## Missing docstrings", "",
                  "These public objects have no docstring yet:", ""]
        lines += [f"- `{q}`" for q in missing]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) api.md; exit 1 if any public object lacks a docstring."""
    return run("gen_api.py", OUT, generate, argv,
               problems=lambda: [f"missing docstring: {q}" for q in missing])


if __name__ == "__main__":
    sys.exit(main())
