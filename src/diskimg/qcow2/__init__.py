"""qcow2: QEMU's copy-on-write image format (docs/interop/qcow2.txt)."""
