"""diskimg.hostio.sigv4 against botocore's signer as the oracle: the same request, the
same credentials and the same time stamp give the same Authorization header (and so the
same canonical request, string to sign and signing key) -- ranged GET, HEAD, the
multipart upload's POST and PUT, keys that need the exact URI-encoding rules, a session
token and a signed small body."""

from __future__ import annotations

import calendar
import hashlib

import pytest

from diskimg.hostio.sigv4 import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    Credentials,
    canonical_query,
    quote_key,
    sign,
)

auth = pytest.importorskip("botocore.auth")
awsrequest = pytest.importorskip("botocore.awsrequest")
bcreds = pytest.importorskip("botocore.credentials")
bconfig = pytest.importorskip("botocore.config")

STAMP = "20261207T033000Z"
NOW = calendar.timegm((2026, 12, 7, 3, 30, 0, 0, 0, 0))
KEYS = ("disk.qcow2", "dir/with space/a b.qcow2", "ünïcode/ディスク.raw", "a+b=c&d.img",
        "tilde~x/(paren)*star!'q'.vmdk", "percent%20literal")


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore signs at its current time: the fixed stamp instead."""
    import datetime

    fixed = datetime.datetime(2026, 12, 7, 3, 30, 0)
    monkeypatch.setattr(auth, "get_current_datetime", lambda *a, **k: fixed)


def _botocore(method: str, url: str, headers: dict[str, str], body: bytes | None,
              token: str | None, region: str, unsigned: bool) -> str:
    req = awsrequest.AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    req.context["timestamp"] = STAMP
    if unsigned:
        req.context["client_config"] = bconfig.Config(s3={"payload_signing_enabled": False})
    signer = auth.S3SigV4Auth(bcreds.Credentials("AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfi", token),
                              "s3", region)
    signer.add_auth(req)
    return str(req.headers["Authorization"])


def _ours(method: str, url: str, headers: dict[str, str], body: bytes | None,
          token: str | None, region: str, unsigned: bool) -> str:
    payload = UNSIGNED_PAYLOAD if unsigned else (
        hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256)
    out = sign(method, url, headers, Credentials("AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfi", token),
               region, payload_hash=payload, now=NOW)
    assert out["X-Amz-Date"] == STAMP
    assert out["X-Amz-Content-SHA256"] == payload
    assert ("X-Amz-Security-Token" in out) == bool(token)
    return out["Authorization"]


CASES = [
    ("GET", "/bucket/{key}", "", {"Range": "bytes=0-511"}, None, None, True),
    ("GET", "/bucket/{key}", "", {"Range": "bytes=4194304-4195839", "If-Match": '"abc"'},
     None, "FwoGZXIvYXdzE//token+/=", True),
    ("HEAD", "/bucket/{key}", "", {}, None, None, False),
    ("POST", "/bucket/{key}", "uploads", {}, None, None, False),
    ("PUT", "/bucket/{key}", "partNumber=7&uploadId=2~ab.CD-ef_gh%2Bij", {
        "Content-Length": "5242880"}, None, None, True),
    ("POST", "/bucket/{key}", "uploadId=xyz", {"Content-Type": "application/xml"},
     b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"e\"</ETag></Part>"
     b"</CompleteMultipartUpload>", "tok", False),
    ("DELETE", "/bucket/{key}", "uploadId=xyz", {}, None, None, False),
    ("GET", "/bucket", "list-type=2&prefix=a%20b%2F&max-keys=5", {}, None, None, False),
]


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-3"])
@pytest.mark.parametrize("host", ["127.0.0.1:9000", "bucket.s3.amazonaws.com"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("key", KEYS)
def test_authorization_equals_botocore(key: str, case: int, host: str, region: str) -> None:
    method, path, query, headers, body, token, unsigned = CASES[case]
    scheme = "http" if host.startswith("127.") else "https"
    url = f"{scheme}://{host}{path.format(key=quote_key(key))}" + (f"?{query}" if query else "")
    got = _ours(method, url, headers, body, token, region, unsigned)
    want = _botocore(method, url, headers, body, token, region, unsigned)
    assert got == want


def test_key_and_query_encoding() -> None:
    assert quote_key("a b/ü+~*") == "a%20b/%C3%BC%2B~%2A"
    assert canonical_query("uploads") == "uploads="
    assert canonical_query("b=2&a=x%2fy&a=1") == "a=1&a=x%2Fy&b=2"


def test_credentials_repr_hides_the_secret() -> None:
    assert "wJalr" not in repr(Credentials("AK", "wJalr", "tok"))
