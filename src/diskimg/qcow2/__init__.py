"""qcow2: QEMU's copy-on-write image format (docs/interop/qcow2.txt).

Also the package's lazy module globals (:func:`lazy_modules`; the made-on-first-use
attribute, :class:`~diskimg.slotted.OnFirstUse`, is shared with the device layer), so
that opening an image for ``info`` loads only what reading its header takes (start-up:
tests/perf/test_startup_imports.py)."""

from __future__ import annotations

from diskimg.slotted import OnFirstUse as OnFirstUse  # (re-exported: it lived here)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class LazyModule:
    """A module's global ``var`` standing for module ``name``: the first attribute read
    imports that module and puts it in the global's place (``namespace``, the holder's
    ``globals()``), so later uses are plain module attribute reads.  For the modules of
    rarer work (writes, compressed clusters, encryption) that ``info`` does not need."""

    __slots__ = ("_name", "_namespace", "_var")

    def __init__(self, name: str, namespace: dict[str, Any], var: str) -> None:
        self._name = name
        self._namespace = namespace
        self._var = var

    def __getattr__(self, attr: str) -> Any:
        module = __import__(self._name, fromlist=["_"])
        self._namespace[self._var] = module
        return module.__dict__[attr]


def lazy_modules(namespace: dict[str, Any], package: str, **modules: str) -> None:
    """``var=name``: make global ``var`` of ``namespace`` a :class:`LazyModule` for
    module ``package.name``."""
    for var, name in modules.items():
        namespace[var] = LazyModule(f"{package}.{name}", namespace, var)
