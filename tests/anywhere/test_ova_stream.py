"""examples/ova_stream.py: an OVA streamed into a pipe, without a temporary file, is a
valid tar whose manifest hashes match its members and whose vmdk qemu-img reads as the
source's guest bytes."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
from qemukit import QEMU

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ova_stream", REPO / "examples" /
                                                  "ova_stream.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ova_into_a_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # unset (the example sets it to pin the CID): restored after the test either way
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    src = tmp_path / "src.qcow2"
    QEMU.img("create", "-q", "-f", "qcow2", src, "5M")
    QEMU.io(src, "write -P 0x3c 0 700k", "write -P 0x77 4M 65536")
    ova = _example()
    sizes: list[int] = []
    blob = ova.into_pipe(lambda pipe: sizes.append(ova.stream_ova(str(src), pipe, name="app")))
    size = sizes[0]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert tar.getnames() == ["app.ovf", "app.mf", "disk1.vmdk"]
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert len(files["disk1.vmdk"]) == size
    manifest = files["app.mf"].decode()
    for name in ("app.ovf", "disk1.vmdk"):
        assert f"SHA256({name})= {hashlib.sha256(files[name]).hexdigest()}\n" in manifest
    assert f'ovf:size="{size}"' in files["app.ovf"].decode()
    vmdk = tmp_path / "disk1.vmdk"
    vmdk.write_bytes(files["disk1.vmdk"])
    assert QEMU.compare(src, vmdk) == 0
    QEMU.check_clean(vmdk)
    assert QEMU.info(vmdk)["format-specific"]["data"]["create-type"] == "streamOptimized"
