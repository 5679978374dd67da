"""Shared test helpers: hypothesis profiles, qemu-img/qemu-io access, fixture images.

Fixtures defined here:

- ``qemu``: the shared ``qemukit.Qemu`` (``img``, ``io``, ``json``, ``map``, ``check``,
  ``check_clean``, ``compare``, ``raw_bytes``); module-level helpers import ``QEMU`` from
  ``qemukit`` instead (tests/ is on ``sys.path``).
- ``qemu_img`` / ``qemu_io``: absolute path of the tool, or the test is skipped.
- ``run``: ``run(cmd, check=True, **kw)`` runs a command (list) and returns the
  ``CompletedProcess`` with text output; on an unexpected exit code the assertion message
  shows the command, exit code and stderr.
- ``make_image``: ``make_image(name, fmt="raw", size=..., *, tool="qemu", options=None)``
  creates an image under ``tmp_path`` with ``qemu-img create`` (``tool="qemu"``) or
  ``diskimg.create`` (``tool="diskimg"``) and returns its path.
- ``fixture_file``: ``fixture_file(name)`` returns a usable copy of ``fixtures/NAME`` in
  ``tmp_path``, gunzipping ``NAME.gz`` when only that is stored.

Tests that need qemu are marked ``@pytest.mark.qemu`` and are skipped automatically when
``qemu-img`` is not on ``PATH``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"

# tests/ on sys.path: the shared qemu helper module (qemukit) is imported by plain name.
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

# qemu-img's LUKS create times PBKDF2 and now and then fails on a loaded machine ("Unable
# to get accurate CPU usage"); importing qemukit puts tests/tools/qemu-img, which retries
# just that, first on PATH before any test module looks qemu-img up.
from qemukit import QEMU, Qemu  # noqa: E402

# --- hypothesis profiles -------------------------------------------------------------------
# "ci": reproducible (derandomize) and bounded, so the suite has a predictable run time.
# "dev": hypothesis' defaults without a deadline (qemu subprocesses are slow and jittery).
# "thorough": for hunting bugs locally: HYPOTHESIS_PROFILE=thorough pytest tests/property
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")
)

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if QEMU_IMG and QEMU_IO:
        return
    skip = pytest.mark.skip(reason="qemu-img/qemu-io not installed (apt-get install qemu-utils)")
    for item in items:
        if item.get_closest_marker("qemu") is not None:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    if not QEMU_IMG:
        return "qemu-img: not found, tests marked 'qemu' are skipped"
    out = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True).stdout
    hyp = settings.get_current_profile_name()
    return f"{out.splitlines()[0] if out else 'qemu-img: ?'}; hypothesis profile: {hyp}"


@pytest.fixture
def qemu_img() -> str:
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    return QEMU_IMG


@pytest.fixture
def qemu() -> Qemu:
    """The shared :class:`qemukit.Qemu` (qemu-img through tests/tools/qemu-img, qemu-io)."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    return QEMU


@pytest.fixture
def qemu_io() -> str:
    if QEMU_IO is None:
        pytest.skip("qemu-io not installed")
    return QEMU_IO


RunFn = Callable[..., "subprocess.CompletedProcess[str]"]


def run_cmd(
    cmd: Sequence[str | os.PathLike[str]],
    check: bool | int | Sequence[int] = True,
    timeout: float = 120,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; ``check`` True means exit 0, an int or ints name the expected codes."""
    res = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, **kw,
    )
    if check is not False:
        ok = (0,) if check is True else ((check,) if isinstance(check, int) else tuple(check))
        assert res.returncode in ok, (
            f"{' '.join(map(str, cmd))} exited {res.returncode}\n"
            f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}"
        )
    return res


@pytest.fixture
def run() -> RunFn:
    return run_cmd


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    def make(
        name: str,
        fmt: str = "raw",
        size: int | str = 1 << 20,
        *,
        tool: str = "qemu",
        options: dict[str, str] | None = None,
    ) -> Path:
        path = tmp_path / name
        if tool == "qemu":
            if QEMU_IMG is None:
                pytest.skip("qemu-img not installed")
            cmd = [QEMU_IMG, "create", "-q", "-f", fmt]
            if options:
                cmd += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
            run_cmd([*cmd, path, str(size)])
        else:
            import diskimg
            from diskimg.units import parse_size

            nbytes = size if isinstance(size, int) else parse_size(size)
            diskimg.create(path, fmt, nbytes, options=options)
        return path

    return make


@pytest.fixture
def fixture_file(tmp_path: Path) -> Callable[[str], Path]:
    def get(name: str) -> Path:
        src = FIXTURES / name
        dst = tmp_path / name
        if src.exists():
            shutil.copyfile(src, dst)
            return dst
        gz = FIXTURES / (name + ".gz")
        if not gz.exists():
            raise FileNotFoundError(f"no fixture {name} or {name}.gz in {FIXTURES}")
        with gzip.open(gz, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return dst

    return get
