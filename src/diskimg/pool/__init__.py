"""libvirt-compatible directory storage pools and volumes, without libvirtd.

>>> from diskimg.pool import PoolRegistry
>>> reg = PoolRegistry()     # $DISKIMG_STORAGE_DIR, /etc/libvirt/storage (root) or
>>>                          # ~/.config/libvirt/storage, as libvirt
>>> pool = reg.define("images", "/srv/images")
>>> pool.build(); pool.start()
>>> vol = pool.create_volume("vm1.qcow2", "20G", "qcow2")
>>> print(vol.to_xml())

Modules, one job each: :mod:`~diskimg.pool.paths` (names, where files live),
:mod:`~diskimg.pool.locking` (per-volume and QEMU locks), :mod:`~diskimg.pool.probe` (what a
volume file is), :mod:`~diskimg.pool.create` (making volume files), :mod:`~diskimg.pool.wipe`,
:mod:`~diskimg.pool.volume`, :mod:`~diskimg.pool.pool`, :mod:`~diskimg.pool.registry`,
:mod:`~diskimg.pool.xml` (libvirt XML).  See docs/pools.md.  The ``diskimg virsh ...`` /
``diskimg pool ...`` commands are :func:`diskimg.pool.cli.main` (grammar in
:mod:`~diskimg.pool.cmdline`, commands in :mod:`~diskimg.pool.pool_commands` and
:mod:`~diskimg.pool.vol_commands`).
"""

from diskimg.pool.paths import (
    default_config_dir,
    default_state_dir,
    libvirt_session_dir,
)
from diskimg.pool.pool import Pool, PoolInfo
from diskimg.pool.registry import PoolRegistry
from diskimg.pool.scale import parse_scaled, unit_scale
from diskimg.pool.volume import Volume, VolumeInfo
from diskimg.pool.wipe import WIPE_ALGORITHMS
from diskimg.pool.xml import (
    BackingStore,
    Encryption,
    Permissions,
    PoolDef,
    Timestamps,
    VolumeDef,
)

__all__ = [
    "WIPE_ALGORITHMS",
    "BackingStore",
    "Encryption",
    "Permissions",
    "Pool",
    "PoolDef",
    "PoolInfo",
    "PoolRegistry",
    "Timestamps",
    "Volume",
    "VolumeDef",
    "VolumeInfo",
    "default_config_dir",
    "default_state_dir",
    "libvirt_session_dir",
    "parse_scaled",
    "unit_scale",
]
