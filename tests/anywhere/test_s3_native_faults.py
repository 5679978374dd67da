"""Faults of diskimg's own S3 client against the moto server, and its dispatch rule:
bad credentials are a 403 naming the s3:// URL, a missing key a 404, an object replaced
between reads an error (ETag), never a mix; a failed upload (the source fails after a
part was stored, the store refuses the credentials, the bucket is missing) leaves no
object and no pending multipart upload; which URLs the native client serves and with
which endpoint, region and credentials (no server needed for those)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from anywhere.s3_server import S3, s3_server  # noqa: E402

import diskimg  # noqa: E402
from diskimg.errors import DiskImgError, RemoteError, UsageError  # noqa: E402
from diskimg.hostio.http import HttpHost  # noqa: E402
from diskimg.hostio.s3 import open_s3, xml_field  # noqa: E402
from diskimg.hostio.s3conf import native_config  # noqa: E402
from diskimg.hostio.sink import SinkError  # noqa: E402


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def opts(s3: S3) -> dict[str, Any]:
    return {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}


def _pending(s3: S3) -> list[Any]:
    return list(s3.fs().call_s3("list_multipart_uploads", Bucket=s3.bucket)
                .get("Uploads", []))


def test_bad_credentials_are_403_naming_the_url(s3: S3, opts: dict[str, Any]) -> None:
    url = s3.url("f/obj.raw")
    s3.fs().pipe(url, os.urandom(10_000))
    with s3.deny_all(), pytest.raises(RemoteError) as ei:
        open_s3(url, storage_options={**opts, "key": "nobody", "secret": "bad"})
    assert ei.value.status == 403 and ei.value.url == url
    assert f"'{url}'" in str(ei.value) and "403" in str(ei.value)
    assert "access denied" in str(ei.value)


def test_missing_key_is_404(s3: S3, opts: dict[str, Any]) -> None:
    url = s3.url("f/none.qcow2")
    with pytest.raises(RemoteError) as ei:
        diskimg.open(url, storage_options=opts)
    assert ei.value.status == 404 and f"'{url}'" in str(ei.value)
    assert "no such object" in str(ei.value)


def test_replaced_object_is_an_error_never_a_mix(s3: S3, opts: dict[str, Any]) -> None:
    url = s3.url("f/changing.raw")
    data = os.urandom(3 << 20)
    fs = s3.fs()
    fs.pipe(url, data)
    host = open_s3(url, storage_options=opts)
    try:
        assert isinstance(host, HttpHost)
        assert host.pread(0, 4096) == data[:4096]
        fs.pipe(url, bytes(len(data)))             # same size, another ETag
        with pytest.raises(RemoteError, match="changed") as ei:
            host.pread(2 << 20, 4096)
        assert ei.value.url == url and ei.value.offset == 2 << 20
        with pytest.raises(RemoteError, match="changed"):   # cached blocks too
            host.pread(0, 4096)
    finally:
        host.close()


def test_read_only(s3: S3, opts: dict[str, Any]) -> None:
    url = s3.url("f/ro.raw")
    s3.fs().pipe(url, bytes(4096))
    with pytest.raises(UsageError, match="read-only"):
        diskimg.open(url, "r+", storage_options=opts)


@pytest.mark.parametrize("how", ["source-fails", "denied", "no-bucket"])
def test_failed_upload_leaves_nothing(s3: S3, opts: dict[str, Any], tmp_path: Path,
                                      how: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(12 << 20))
    url = s3.url(f"up/{how}.raw") if how != "no-bucket" else "s3://no-such-bucket/x.raw"
    with diskimg.open(src) as dev:
        if how == "source-fails":
            real = dev.readinto
            seen: list[int] = []

            def failing(offset: int, buf: Any, *a: Any, **k: Any) -> Any:
                if offset >= 8 << 20:             # one 5 MiB part stored by then
                    seen.append(len(_pending(s3)))
                    raise DiskImgError(f"injected read error at {offset}")
                return real(offset, buf, *a, **k)

            dev.readinto = failing  # type: ignore[method-assign]
            with pytest.raises(DiskImgError, match="injected"):
                diskimg.convert(dev, url, "raw", storage_options=opts)
            assert seen == [1]                   # the upload was under way
        else:
            bad = {**opts, "key": "nobody", "secret": "bad"} if how == "denied" else opts
            with s3.deny_all() if how == "denied" else _nothing():
                with pytest.raises(SinkError) as ei:
                    diskimg.convert(dev, url, "raw", storage_options=bad)
            assert f"'{url}'" in str(ei.value) and ei.value.offset == 0
            assert ("403" if how == "denied" else "404") in str(ei.value)
    if how != "no-bucket":
        assert not s3.fs(skip_instance_cache=True).exists(url)
    assert _pending(s3) == []


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_pickles_as_url_and_options(s3: S3, opts: dict[str, Any]) -> None:
    url = s3.url("f/pickled.raw")
    data = os.urandom(1 << 20)
    s3.fs().pipe(url, data)
    with diskimg.open(url, storage_options=opts) as dev:
        blob = pickle.dumps(dev)
    with pickle.loads(blob) as again:
        assert again.filename == url and again.read(0, len(data)) == data


# --- the rule: which client, which endpoint, region and credentials -------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for k in list(os.environ):
        if k.startswith(("AWS_", "FSSPEC_S3")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    return monkeypatch


def test_rule_storage_options(clean_env: pytest.MonkeyPatch) -> None:
    base = {"key": "AK", "secret": "SK"}
    cfg = native_config("s3://b/k/x y.qcow2", {**base, "endpoint_url": "http://h:9000",
                                                "x-timeout": 5})
    assert cfg is not None and cfg.object_url() == "http://h:9000/b/k/x%20y.qcow2"
    assert cfg.timeout == 5 and cfg.region == "us-east-1" and cfg.creds is not None
    assert native_config("s3://b/k", {**base, "skip_instance_cache": True}) is None
    assert native_config("s3://b/k", {**base, "x-client": "fsspec"}) is None
    assert native_config("s3://b/k", {}) is None               # no credentials: fsspec
    anon = native_config("s3a://b/k", {"anon": True,
                                        "client_kwargs": {"region_name": "eu-west-3"}})
    assert anon is not None and anon.creds is None
    assert anon.object_url() == "https://b.s3.eu-west-3.amazonaws.com/k"
    dotted = native_config("s3://a.b/k", {**base})
    assert dotted is not None and dotted.object_url() == "https://s3.us-east-1.amazonaws.com/a.b/k"
    with pytest.raises(UsageError, match="x-client"):
        native_config("s3://b/k", {"x-client": "boto"})
    with pytest.raises(UsageError, match="does not understand"):
        native_config("s3://b/k", {**base, "x-client": "native", "use_ssl": False})
    with pytest.raises(UsageError, match="no credentials"):
        native_config("s3://b/k", {"x-client": "native"})


def test_rule_environment_and_files(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = DEF\naws_secret_access_key = S1\n"
                     "[work]\naws_access_key_id = WORK\naws_secret_access_key = S2\n"
                     "aws_session_token = T2\n")
    conf = tmp_path / "config"
    conf.write_text("[profile work]\nregion = ap-south-1\n")
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    clean_env.setenv("AWS_CONFIG_FILE", str(conf))
    cfg = native_config("s3://b/k", None)
    assert cfg is not None and cfg.creds is not None and cfg.creds.key == "DEF"
    clean_env.setenv("AWS_PROFILE", "work")
    cfg = native_config("s3://b/k", None)
    assert cfg is not None and cfg.creds is not None
    assert (cfg.creds.key, cfg.creds.token, cfg.region) == ("WORK", "T2", "ap-south-1")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "ENV")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "SENV")
    clean_env.setenv("AWS_REGION", "us-west-2")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    cfg = native_config("s3://b/k", None)
    assert cfg is not None and cfg.creds is not None
    assert (cfg.creds.key, cfg.region, cfg.endpoint) == ("ENV", "us-west-2", "http://aws-env:1")
    clean_env.setenv("FSSPEC_S3_ENDPOINT_URL", "http://fsspec-env:2")
    clean_env.setenv("FSSPEC_S3_KEY", "FK")
    clean_env.setenv("FSSPEC_S3_SECRET", "FS")
    cfg = native_config("s3://b/k", None)
    assert cfg is not None and cfg.creds is not None
    assert (cfg.creds.key, cfg.endpoint) == ("FK", "http://fsspec-env:2")
    cfg = native_config("s3://b/k", {"endpoint_url": "http://opt:3", "key": "OK",
                                     "secret": "OS"})
    assert cfg is not None and cfg.creds is not None
    assert (cfg.creds.key, cfg.endpoint) == ("OK", "http://opt:3")


def test_rule_follows_fsspec_configuration(clean_env: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    import sys

    import fsspec.config

    base = {"key": "AK", "secret": "SK"}
    clean_env.setitem(fsspec.config.conf, "s3", {"endpoint_url": "http://conf:1",
                                                 "anon": "false"})
    cfg = native_config("s3://b/k", base)
    assert cfg is not None and cfg.endpoint == "http://conf:1" and cfg.creds is not None
    clean_env.setitem(fsspec.config.conf, "s3", {"skip_instance_cache": True})
    assert native_config("s3://b/k", base) is None
    # fsspec not loaded: its other variables and its config files send s3 to fsspec
    clean_env.delitem(sys.modules, "fsspec.config")
    clean_env.setenv("FSSPEC_CONFIG_DIR", str(tmp_path))
    assert native_config("s3://b/k", base) is not None
    clean_env.setenv("FSSPEC_S3_USE_SSL", "false")
    assert native_config("s3://b/k", base) is None
    clean_env.delenv("FSSPEC_S3_USE_SSL")
    (tmp_path / "conf.json").write_text('{"s3": {"endpoint_url": "http://file:2"}}')
    assert native_config("s3://b/k", base) is None
    assert native_config("s3://b/k", {**base, "x-client": "native"}) is not None


def test_xml_field_is_bounded_and_unescaped() -> None:
    body = b"<?xml version='1.0'?><R><UploadId>a&amp;b&quot;c</UploadId></R>"
    assert xml_field(body, "UploadId") == 'a&b"c'
    assert xml_field(b"<UploadId>" + b"x" * 5000 + b"</UploadId>", "UploadId") is None
    assert xml_field(b"<Error><Code>NoSuchUpload</Code></Error>", "Code") == "NoSuchUpload"


# --- a hostile or broken store (a stdlib server standing in for S3) -------------------
class _Store:
    """A fake S3 endpoint: ``mode`` says how it misbehaves; ``seen`` logs the requests."""

    def __init__(self, mode: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        store = self
        self.mode = mode
        self.seen: list[str] = []
        self.completed = False

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes = b"",
                       headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                store.seen.append(f"{self.command} {self.path.split('?', 1)[-1][:10]}")
                if self.command == "POST" and self.path.endswith("?uploads"):
                    if store.mode == "drop-create":
                        self.close_connection = True     # no reply at all
                        return
                    if store.mode == "huge-reply":
                        self._reply(200, b"<UploadId>" + b"x" * (100 << 10))
                    else:
                        self._reply(200, b"<R><UploadId>u1</UploadId></R>")
                elif self.command == "PUT":
                    self._reply(200, headers={"ETag": '"e"'})
                elif self.command == "POST" and store.mode == "drop-complete":
                    if store.completed:              # the retry: the upload is gone
                        self._reply(404, b"<Error><Code>NoSuchUpload</Code></Error>")
                    else:                            # completed, then the reply is lost
                        store.completed = True
                        self.close_connection = True
                elif self.command == "HEAD" and store.mode == "drop-complete":
                    self.send_response(200)
                    self.send_header("Content-Length", str(6 << 20))
                    self.end_headers()
                elif self.command == "POST":      # complete: 200 with an error inside
                    self._reply(200, b"<Error><Code>InternalError</Code>"
                                     b"<Message>try again</Message></Error>")
                elif self.command == "HEAD" and store.mode == "moved":
                    self._reply(301, headers={"x-amz-bucket-region": "eu-west-3"})
                else:                              # DELETE (abort), HEAD
                    self._reply(204)

            do_POST = do_PUT = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["huge-reply", "error-in-200"])
def test_hostile_store_replies_end_in_sink_error(mode: str) -> None:
    from diskimg.hostio.url_sink import open_url_sink

    store = _Store(mode)
    url = "s3://bkt/out.raw"
    try:
        sink = open_url_sink(url, {"endpoint_url": store.endpoint, "key": "k",
                                   "secret": "s"}, size_hint=6 << 20)
        with pytest.raises(SinkError) as ei:
            with sink:
                sink.write(bytes(6 << 20))
        assert f"'{url}'" in str(ei.value)
        if mode == "huge-reply":
            assert "longer than 65536" in str(ei.value) and ei.value.offset == 0
        else:
            assert "InternalError" in str(ei.value) and "try again" in str(ei.value)
            assert ei.value.offset == 6 << 20
            assert store.seen[-1] == "DELETE uploadId=u"     # the upload was aborted
    finally:
        store.close()


def test_bucket_in_another_region_says_so() -> None:
    store = _Store("moved")
    url = "s3://bkt/disk.qcow2"
    try:
        with pytest.raises(RemoteError) as ei:
            open_s3(url, storage_options={"endpoint_url": store.endpoint, "key": "k",
                                          "secret": "s"})
        assert ei.value.status == 301 and f"'{url}'" in str(ei.value)
        assert "another region" in str(ei.value) and "AWS_REGION" in str(ei.value)
    finally:
        store.close()


def test_retries_only_where_safe() -> None:
    """CreateMultipartUpload is not sent twice (a second upload would be left pending);
    a completion whose reply was lost is retried, and the store's answer that the
    upload is gone is settled by the HEAD: the object is there, no error."""
    from diskimg.hostio.url_sink import open_url_sink

    opts = {"key": "k", "secret": "s"}
    store = _Store("drop-create")
    try:
        sink = open_url_sink("s3://bkt/a.raw", {**opts, "endpoint_url": store.endpoint},
                             size_hint=6 << 20)
        with pytest.raises(SinkError, match="connection failed"), sink:
            sink.write(bytes(6 << 20))
        assert store.seen == ["POST uploads"]
    finally:
        store.close()
    store = _Store("drop-complete")
    try:
        with open_url_sink("s3://bkt/b.raw", {**opts, "endpoint_url": store.endpoint},
                           size_hint=6 << 20) as sink:
            sink.write(bytes(6 << 20))
        assert [x.split()[0] for x in store.seen] == ["POST", "PUT", "POST", "POST", "HEAD"]
    finally:
        store.close()
