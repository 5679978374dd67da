"""S3Sink: a new object at ``s3://bucket/key`` written front to back by diskimg's own S3
client (:mod:`diskimg.hostio.s3`): a multipart upload, committed only when complete.

- parts: :func:`~diskimg.hostio.remote_sink.part_size` of the expected size (S3's
  smallest, 5 MiB, while 10,000 parts hold it), or growing by
  :func:`~diskimg.hostio.remote_sink.next_part_size` when the size is not known; each
  part is sent straight from the buffer it was gathered in (or from the caller's buffer,
  for a write of a whole part): no copy of a part;
- the upload (CreateMultipartUpload) starts with the first whole part; an output
  smaller than one part is one ``PUT``;
- ``close()`` sends the last part and CompleteMultipartUpload (a 200 reply holding an
  ``<Error>`` is a failure), then checks the object's size with a ``HEAD``;
- any failure, and ``abort()``, ends the upload (AbortMultipartUpload): a failed convert
  leaves no object and no pending upload, and an existing object unchanged;
- a request whose connection failed before the reply is sent once more, except
  CreateMultipartUpload (a second upload would be left pending); a completion retried
  after the first attempt took effect finds no upload (404), and the ``HEAD`` decides;
- errors are :class:`~diskimg.hostio.sink.SinkError` naming the ``s3://`` URL, the offset
  of the first byte not stored, the HTTP status and S3's error code.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

from diskimg.hostio.httpwire import ProtocolError
from diskimg.hostio.remote_sink import MAX_PARTS, next_part_size, part_size
from diskimg.hostio.s3 import S3Client, xml_field
from diskimg.hostio.sink import Sink, SinkError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from diskimg.hostio.httpwire import Response
    from diskimg.hostio.s3conf import S3Config


class _Failed(Exception):
    """A request failed: the message says how; ``status``: the store's HTTP status
    (None: no reply)."""

    def __init__(self, what: str, status: int | None = None) -> None:
        super().__init__(what)
        self.status = status


class S3Sink(Sink):
    """A new object written in order by a multipart upload (see the module docstring)."""

    def __init__(self, cfg: S3Config, *, part: int, grow: bool) -> None:
        super().__init__(-1, cfg.url, owned=True, buffer=part)
        self.url = cfg.url
        self._client = S3Client(cfg)
        self._base = part
        self._grow = grow
        self._upload: str | None = None
        self._etags: list[str] = []

    # --- requests ---------------------------------------------------------------------
    def _call(self, method: str, query: str = "", body: bytes | bytearray | memoryview |
              None = None, payload_hash: str | None = None,
              headers: dict[str, str] | None = None, retry: bool = True
              ) -> tuple[Response, bytes]:
        """One request; a reply that is not 2xx (or a 200 holding an ``<Error>``) is
        :class:`_Failed`."""
        kw = {} if payload_hash is None else {"payload_hash": payload_hash}
        try:
            resp, data = self._client.call(method, query, headers, body, retry=retry, **kw)
        except TimeoutError:
            raise _Failed(f"timed out after {self._client.cfg.timeout or 30:g} s") from None
        except (OSError, ProtocolError) as e:
            raise _Failed(f"connection failed twice: {e or type(e).__name__}") from None
        if resp.status >= 300 or b"<Error>" in data[:512]:
            code = xml_field(data, "Code") or ""
            msg = xml_field(data, "Message") or resp.reason
            if resp.status == 403:
                msg = f"access denied: {msg}"
            elif resp.status == 404:
                msg = f"not found (no such bucket, or the upload is gone): {msg}"
            raise _Failed(f"HTTP {resp.status}{' ' + code if code else ''}: {msg}",
                          resp.status)
        return resp, data

    def _error(self, e: _Failed, offset: int) -> SinkError:
        return SinkError(f"Could not write '{self.url}' at offset {offset}: {e}",
                         path=self.url, offset=offset)

    def _start(self) -> None:
        _, data = self._call("POST", "uploads", retry=False)  # a retry: a 2nd upload
        upload = xml_field(data, "UploadId")
        if not upload:
            raise _Failed("CreateMultipartUpload: no UploadId in the reply")
        self._upload = upload

    def _send_part(self, mv: memoryview) -> None:
        if self._upload is None:
            self._start()
        n = len(self._etags) + 1
        if n > MAX_PARTS:
            raise _Failed(f"more than {MAX_PARTS} parts")
        resp, _ = self._call("PUT", f"partNumber={n}&uploadId={quote(self._upload or '', safe='')}",
                             mv)
        etag = resp.header("ETag")
        if not etag:
            raise _Failed(f"UploadPart {n}: no ETag in the reply")
        self._etags.append(etag)
        if self._grow:
            self._limit = max(self._limit, next_part_size(n, self._base))

    def _complete(self) -> None:
        from xml.sax.saxutils import escape

        body = ("<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{i}</PartNumber><ETag>{escape(t)}</ETag></Part>"
            for i, t in enumerate(self._etags, 1)) + "</CompleteMultipartUpload>").encode()
        try:
            self._call("POST", f"uploadId={quote(self._upload or '', safe='')}", body,
                       hashlib.sha256(body).hexdigest(), {"Content-Type": "application/xml"})
        except _Failed as e:
            # the connection failed under the first attempt, which completed the upload:
            # the retry finds no upload; the HEAD that follows checks the object
            if not (self._client.retried and e.status == 404):
                raise

    def _verify(self) -> None:
        resp, _ = self._call("HEAD")
        size = resp.header("Content-Length")
        if size != str(self.offset):
            raise _Failed(f"the store holds {size} bytes after the upload of {self.offset}")

    # --- the Sink ---------------------------------------------------------------------
    def _out(self, mv: memoryview) -> None:
        """Send ``mv`` (at least one part's size) as the next part."""
        try:
            self._send_part(mv)
        except _Failed as e:
            at = self._done
            self.abort()
            raise self._error(e, at) from None
        except BaseException:
            self.abort()
            raise
        self._done += len(mv)

    def flush(self) -> None:
        """Nothing: parts go out whole (S3's least part is 5 MiB); :meth:`close` sends
        the rest."""

    def close(self) -> None:
        """Send what is left and commit the object (once); on failure the upload is
        aborted and :class:`SinkError` raised."""
        if self.closed:
            return
        at = self._done
        try:
            buf, self._buf = self._buf, bytearray()
            if self._upload is None:
                self._call("PUT", "", buf)
            else:
                if buf:
                    self._send_part(memoryview(buf))
                at = self.offset
                self._complete()
                self._upload = None               # committed: nothing to abort
            del buf
            at = self.offset
            self._verify()
        except _Failed as e:
            self.abort()
            raise self._error(e, at) from None
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._client.close()

    def abort(self) -> None:
        """Discard the upload: nothing becomes visible under the URL."""
        self._buf = bytearray()
        self.closed = True
        upload, self._upload = self._upload, None
        if upload is not None:
            try:
                self._call("DELETE", f"uploadId={quote(upload, safe='')}")
            except _Failed:  # best effort: an upload never completed is never visible
                pass
        self._client.close()


def open_s3_sink(cfg: S3Config, *, size_hint: int | None = None) -> S3Sink:
    """A new object at ``cfg.url`` as an :class:`S3Sink` (``size_hint``: the expected
    size, which picks the part size; without it the parts grow)."""
    return S3Sink(cfg, part=part_size(size_hint), grow=size_hint is None)
