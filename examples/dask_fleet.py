"""Check, inspect and convert every image under an fsspec prefix on a Dask cluster, and
collect one table (a list of dicts, written as CSV).

Each task gets a URL and the filesystem's options -- never an open image -- opens the
image where it runs (``diskimg.open(url, storage_options=...)``), checks it, reads what
``qemu-img info`` shows, and converts it to qcow2 straight into a new object under
``--dest`` (a multipart upload; no temporary file).
One image failing (corrupt, refused, unreachable) is one row with an ``error``, not a
failed run.

    python examples/dask_fleet.py s3://bucket/images/ --dest s3://bucket/converted/ \\
        --option endpoint_url=http://127.0.0.1:9000 --csv fleet.csv
    python examples/dask_fleet.py s3://bucket/images/ --scheduler tcp://10.0.0.5:8786

Without arguments it runs a self-contained demo in the current directory: three images
in a ``memory://`` store, a threaded LocalCluster (memory:// lives in one process),
``fleet.csv`` written and every row asserted.  Needs ``diskimg[remote]`` and
``dask[distributed]``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import diskimg

#: the table's columns, in order
COLUMNS = ("url", "format", "virtual_size", "cluster_size", "backing", "check_errors",
           "corruptions", "leaks", "image_end_offset", "converted", "converted_sha256",
           "error")


def list_images(prefix: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Every object under ``prefix`` as a URL with the prefix's scheme, sorted."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(prefix, **dict(storage_options or {}))
    scheme = prefix.split("://", 1)[0]
    keys = sorted(fs.find(path))
    return [f"{scheme}://{k.lstrip('/')}" for k in keys]


def inspect_image(url: str, storage_options: Mapping[str, Any] | None = None,
                  dest_prefix: str | None = None, out_format: str = "qcow2"
                  ) -> dict[str, Any]:
    """One row: ``qemu-img check`` and ``info`` of the image at ``url``, and (with
    ``dest_prefix``) the URL and sha256 of its conversion to ``out_format``."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["url"] = url
    try:
        with diskimg.open(url, storage_options=storage_options, for_check=True,
                          untrusted=True) as dev:
            info = dev.info()
            row.update(format=info.format, virtual_size=info.virtual_size,
                       cluster_size=info.cluster_size, backing=info.backing_filename)
            if dev.supports_check:
                rep = dev.check()
                row.update(check_errors=rep.check_errors, corruptions=rep.corruptions,
                           leaks=rep.leaks,
                           # as qemu-img: no image end offset reported is None
                           image_end_offset=rep.image_end_offset or None)
            if dest_prefix is not None:
                row.update(_convert(dev, url, storage_options, dest_prefix, out_format))
    except diskimg.DiskImgError as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


class _Hashing:
    """A write-only file object: bytes go on to ``sink`` and into a sha256."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        self.sink.write(data)
        return len(data)


def _convert(dev: diskimg.BlockDevice, url: str, storage_options: Mapping[str, Any] | None,
             dest_prefix: str, out_format: str) -> dict[str, Any]:
    """Convert ``dev`` straight into a new object under ``dest_prefix`` (a multipart
    upload: no temporary file; the object appears only once complete, and a failure
    leaves none), hashing the bytes on their way."""
    from diskimg.hostio.url_sink import open_url_sink

    name = url.rstrip("/").rsplit("/", 1)[-1]
    dest = dest_prefix.rstrip("/") + f"/{name}.{out_format}"
    with open_url_sink(dest, storage_options) as sink:   # committed when the block ends
        out = _Hashing(sink)
        diskimg.convert(dev, out, out_format)
    return {"converted": dest, "converted_sha256": out.sha256.hexdigest()}


def fleet(client: Any, prefix: str, storage_options: Mapping[str, Any] | None = None,
          dest_prefix: str | None = None, out_format: str = "qcow2"
          ) -> list[dict[str, Any]]:
    """One row per image under ``prefix``, computed by ``client``'s workers (one task per
    image: URL and options in, a dict out), in URL order."""
    urls = list_images(prefix, storage_options)
    opts = dict(storage_options or {})
    futures = client.map(inspect_image, urls, storage_options=opts,
                         dest_prefix=dest_prefix, out_format=out_format, pure=False)
    rows: list[dict[str, Any]] = client.gather(futures)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _demo() -> None:
    """Three images in memory://, a threaded LocalCluster, every row asserted."""
    import fsspec
    from dask.distributed import Client, LocalCluster

    fs = fsspec.filesystem("memory")
    made = {}
    for name, fmt in (("a.qcow2", "qcow2"), ("b.vmdk", "vmdk"), ("c.raw", "raw")):
        local = f"made-{name}"
        diskimg.create(local, fmt, 4 << 20)
        with diskimg.open(local, "r+") as dev:
            dev.write(1 << 20, bytes([len(made) + 1]) * 65536)
        with open(local, "rb") as f:
            fs.pipe(f"/fleet/in/{name}", f.read())
        made[name] = fmt
    fs.pipe("/fleet/in/junk.bin", b"not an image at all")  # probes as raw: still a row
    with LocalCluster(n_workers=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        rows = fleet(client, "memory://fleet/in/", dest_prefix="memory://fleet/out/")
    write_csv(rows, "fleet.csv")
    by_name = {r["url"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == ["a.qcow2", "b.vmdk", "c.raw", "junk.bin"], by_name
    for name, fmt in made.items():
        r = by_name[name]
        assert r["error"] is None and r["format"] == fmt and r["virtual_size"] == 4 << 20, r
        with diskimg.open(r["converted"]) as out, diskimg.open(f"made-{name}") as src:
            assert out.read(0, out.size) == src.read(0, src.size)
    assert by_name["a.qcow2"]["corruptions"] == 0 and by_name["a.qcow2"]["leaks"] == 0
    assert by_name["junk.bin"]["format"] == "raw"
    for r in rows:
        print(f"{r['url']}: {r['format']} {r['virtual_size']} bytes, "
              f"corruptions={r['corruptions']} leaks={r['leaks']} -> {r['converted']}")
    print("wrote fleet.csv")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix", nargs="?", help="fsspec URL of the images (s3://b/p/ ...)")
    ap.add_argument("--dest", help="fsspec URL prefix to upload the qcow2 conversions to")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a storage option (s3: endpoint_url, key, secret, anon ...)")
    ap.add_argument("--scheduler", help="a Dask scheduler address (default: a "
                    "LocalCluster)")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--csv", default="fleet.csv", help="where to write the table")
    args = ap.parse_args(argv)
    if args.prefix is None:
        _demo()
        return 0
    from dask.distributed import Client, LocalCluster

    opts: dict[str, Any] = {}
    for kv in args.option:
        k, _, v = kv.partition("=")
        opts[k] = v
    if args.scheduler:
        with Client(args.scheduler) as client:
            rows = fleet(client, args.prefix, opts, args.dest)
    else:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            rows = fleet(client, args.prefix, opts, args.dest)
    write_csv(rows, args.csv)
    bad = [r for r in rows if r["error"] or r["corruptions"]]
    print(f"{len(rows)} images, {len(bad)} with errors or corruptions; table: {args.csv}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
