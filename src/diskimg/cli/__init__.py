"""diskimg command-line interface (qemu-img 7.2 compatible)."""
