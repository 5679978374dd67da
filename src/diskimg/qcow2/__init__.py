"""qcow2: QEMU's copy-on-write image format (docs/interop/qcow2.txt).

Also the package's two made-on-first-use helpers, so that opening an image for ``info``
loads only what reading its header takes (start-up: tests/perf/test_startup_imports.py)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class OnFirstUse:
    """A class attribute made for each instance, by ``make(instance)``, when first read,
    then kept as the instance's own attribute (a non-data descriptor: the instance
    attribute takes over, so later reads cost nothing and assignments just replace it).
    Two threads reading it first get the same value."""

    __slots__ = ("make", "name")

    def __init__(self, make: Callable[[Any], object]) -> None:
        self.make = make
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.name, self.make(obj))


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
