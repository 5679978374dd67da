"""libvirt-compatible directory storage pools and volumes, without libvirtd.

>>> from diskimg.pool import PoolRegistry
>>> reg = PoolRegistry()     # $DISKIMG_STORAGE_DIR, /etc/libvirt/storage (root) or
>>>                          # ~/.config/libvirt/storage, as libvirt
>>> pool = reg.define("images", "/srv/images")
>>> pool.build(); pool.start()
>>> vol = pool.create_volume("vm1.qcow2", "20G", "qcow2")
>>> print(vol.to_xml())

See docs/pools.md.  The ``diskimg virsh ...`` / ``diskimg pool ...`` commands are
:func:`diskimg.pool.cli.main`.
"""

from diskimg.pool.pool import (
    WIPE_ALGORITHMS,
    Pool,
    PoolInfo,
    PoolRegistry,
    Volume,
    VolumeInfo,
    default_config_dir,
    default_state_dir,
    libvirt_session_dir,
)
from diskimg.pool.xml import (
    BackingStore,
    Encryption,
    Permissions,
    PoolDef,
    Timestamps,
    VolumeDef,
    parse_scaled,
    unit_scale,
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
