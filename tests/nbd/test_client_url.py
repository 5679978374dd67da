"""NBD URLs (diskimg.nbd.url): the NBD URI standard's examples, qemu's spelling of an
image's file name, and malformed URLs refused naming the part at fault.  A URL that is
refused opens no connection."""

from __future__ import annotations

import pytest

import diskimg
from diskimg.errors import BackingChainError, UsageError
from diskimg.hostio import urls
from diskimg.nbd.url import display_name, is_nbd_url, parse
from diskimg.policy import OpenPolicy


@pytest.mark.parametrize("url,export", [
    ("nbd://example.com/disk", "disk"),
    ("nbd+unix:///disk?socket=sock", "disk"),
    ("nbd://example.com/", ""),
    ("nbd://example.com", ""),
    ("nbd://example.com//disk", "/disk"),
    ("nbd://example.com/hello%20world", "hello world"),
])
def test_export_names_as_the_uri_standard_gives_them(url: str, export: str) -> None:
    assert parse(url).export == export


def test_addresses_and_qemus_spelling() -> None:
    a = parse("nbd://h.example:10900/x")
    assert (a.host, a.port, a.socket, a.tls) == ("h.example", 10900, None, False)
    assert display_name(a) == "nbd://h.example:10900/x"
    assert display_name(parse("NBD+TCP://127.0.0.1")) == "nbd://127.0.0.1:10809"
    assert display_name(parse("nbd://[::1]:7/e")) == "nbd://[::1]:7/e"
    u = parse("nbd+unix:///?socket=/run/n.sock")
    assert (u.host, u.socket, u.export) == (None, "/run/n.sock", "")
    assert display_name(u) == "nbd+unix://?socket=/run/n.sock"
    assert display_name(parse("nbd+unix:///d?socket=s")) == "nbd+unix:///d?socket=s"
    t = parse("nbds+unix:///d?socket=s&tls-certificates=/etc/pki&tls-verify-peer=0")
    assert (t.tls, t.tls_certificates, t.tls_verify) == (True, "/etc/pki", False)
    assert display_name(t) == t.url
    assert is_nbd_url("nbds://h/x") and not is_nbd_url("http://h/x") and \
        not is_nbd_url("nbd:localhost:10809")


@pytest.mark.parametrize("url,field", [
    ("nbd+unix:///d", "socket"),
    ("nbd+unix://host/d?socket=s", "host"),
    ("nbd://h/d?socket=s", "socket"),
    ("nbd:///d", "host"),
    ("nbd://h:99999/d", "port"),
    ("nbd://user@h/d", "userinfo"),
    ("nbd://h/d?color=red", "color"),
    ("nbd://h/d?tls-certificates=/x", "scheme"),
    ("nbds://h/d?tls-verify-peer=2", "tls-verify-peer"),
    ("nbds://h/d?tls-type=psk", "tls-type"),
    ("nbd://h/d#frag", "fragment"),
    ("nbd://h/a%00b", "export"),
    ("nbd://h/" + "x" * 4097, "export"),
    ("nbd+unix:///d?socket=a&socket=b", "socket"),
])
def test_malformed_urls_are_refused_naming_the_part(url: str, field: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse(url)
    assert ei.value.field == field and url in str(ei.value)
    with pytest.raises(UsageError):  # diskimg.open refuses it the same way
        diskimg.open(url)


def test_nbd_names_are_never_followed_as_backing_files() -> None:
    """One rule (hostio/urls.py open_backing), whatever the parent and the spelling."""
    pol = OpenPolicy(allow_remote_backing=True)
    for name, parent in (("nbd://h/x", "https://h/top.qcow2"),
                         ("NBDS+UNIX:///x?socket=/s", "s3://b/top.qcow2"),
                         ("base.qcow2", "nbd+unix:///?socket=/s"),
                         ("base.qcow2", "nbd://h:1/top")):
        with pytest.raises(BackingChainError, match="NBD names are not followed"):
            urls.open_backing(name, parent, pol)


@pytest.mark.parametrize("name,url", [
    ("nbd:unix:/run/n.sock", "nbd+unix:///?socket=/run/n.sock"),
    ("nbd:unix:/run/n.sock:exportname=a b", "nbd+unix:///a%20b?socket=/run/n.sock"),
    ("nbd:h.example:10900", "nbd://h.example:10900"),
    ("nbd:h:7:exportname=x:y", "nbd://h:7/x%3Ay"),
    ("nbd:[::1]:7", "nbd://[::1]:7"),
    ("nbd:[127.0.0.1]:7", "nbd://127.0.0.1:7"),
])
def test_qemus_legacy_names_as_urls(name: str, url: str) -> None:
    assert urls.top_level_name(name) == url
    assert parse(url).export == (name.split(":exportname=") + [""])[1]


@pytest.mark.parametrize("name", ["nbd:h", "nbd:h:x", "nbd:h:0", "nbd:unix:",
                                  "nbd:h:7:exportname=", "nbd:::1:7", "nbd::7"])
def test_malformed_legacy_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        urls.top_level_name(name)
    with pytest.raises(UsageError):
        diskimg.open(name)


def test_other_names_are_not_legacy_nbd() -> None:
    for name in ("nbd://h/x", "disk.qcow2", "./nbd:h:7", "NBD:h:7"):
        assert urls.top_level_name(name) == name
