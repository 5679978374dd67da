"""Loading the sector kernels (:mod:`diskimg.crypto.kernels`) ahead of their first use,
on a thread, while the caller runs without the GIL.  (Its own module: the kernels import
:mod:`diskimg.crypto`, so the package itself cannot import them without a cycle.)"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def preload_kernels() -> Callable[[], None]:
    """Start importing the sector kernels (``cryptography``'s ciphers and,
    with ``diskimg[fast]``, numpy: ~50 ms of imports) on a thread, for a caller about to
    spend a while without the GIL (a key slot's PBKDF2 run).  The import is the ordinary
    one: whoever imports the module next waits for it to finish (Python's per-module
    import lock), and a failure is left for that import to raise.  Returns the function
    that waits for the thread: call it before returning, also on errors, so no import
    is left running (a no-op when the kernels were loaded already)."""
    import sys

    if "diskimg.crypto.kernels" in sys.modules:
        return _loaded
    import threading

    def load() -> None:
        try:
            import diskimg.crypto.kernels  # noqa: F401
        except BaseException:  # raised again by the caller's own import
            pass

    t = threading.Thread(target=load, name="diskimg-preload", daemon=True)
    t.start()
    return t.join


def _loaded() -> None:
    """:func:`preload_kernels`' wait when there was nothing to load."""
