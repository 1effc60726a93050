"""The PROXY protocol parser (cluster/core/proxy_protocol.py), as tables: v1 TCP4/TCP6/UNKNOWN,
v2 binary with TLVs, LOCAL, truncated, oversize and garbage headers. Each header is also fed
a byte at a time the way the listener reads it (bytes_needed says how many more), which must
end exactly at the header's last byte."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from cluster.core.proxy_protocol import (
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyProtocolError,
    bytes_needed,
    parse,
)


def v2(cmd: int = 1, fam: int = 0x11, body: bytes = b"", length: int | None = None,
       ver: int = 2) -> bytes:
    return V2_SIGNATURE + bytes([ver << 4 | cmd, fam]) + \
        struct.pack("!H", len(body) if length is None else length) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + \
        struct.pack("!HH", sport, dport)


def tlv(t: int, v: bytes) -> bytes:
    return bytes([t]) + struct.pack("!H", len(v)) + v


# header -> (version, command, address, port, dest, dport, tlvs)
GOOD = [
    (b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n",
     (1, "PROXY", "192.0.2.10", 56324, "198.51.100.1", 587, {})),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     (1, "PROXY", "255.255.255.255", 65535, "255.255.255.255", 65535, {})),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 0 25\r\n",
     (1, "PROXY", "2001:db8::1", 0, "2001:db8::2", 25, {})),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
     b" 65535 65535\r\n",       # the longest v1 line: 104 bytes
     (1, "PROXY", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535,
      "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, {})),
    (b"PROXY UNKNOWN\r\n", (1, "PROXY", None, None, None, None, {})),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", (1, "PROXY", None, None, None, None, {})),
    (v2(body=inet("203.0.113.7", "10.0.0.5", 40000, 587)),
     (2, "PROXY", "203.0.113.7", 40000, "10.0.0.5", 587, {})),
    (v2(fam=0x21, body=inet("2001:db8::7", "2001:db8::5", 1, 465)),
     (2, "PROXY", "2001:db8::7", 1, "2001:db8::5", 465, {})),
    (v2(body=inet("203.0.113.7", "10.0.0.5", 1, 2) + tlv(0x01, b"smtp") + tlv(0x04, b"")
        + tlv(0x05, b"\x00" * 32)),
     (2, "PROXY", "203.0.113.7", 1, "10.0.0.5", 2,
      {0x01: b"smtp", 0x04: b"", 0x05: b"\x00" * 32})),
    # LOCAL: the proxy's own health check; whatever address block it carries is ignored
    (v2(cmd=0, fam=0x00), (2, "LOCAL", None, None, None, None, {})),
    (v2(cmd=0, fam=0x11, body=inet("1.2.3.4", "5.6.7.8", 1, 2)),
     (2, "LOCAL", None, None, None, None, {})),
    # PROXY with UNSPEC or UNIX: nothing an IP limit can use, the connection's peer counts
    (v2(fam=0x00), (2, "PROXY", None, None, None, None, {})),
    (v2(fam=0x31, body=b"/s".ljust(108, b"\0") + b"/d".ljust(108, b"\0")),
     (2, "PROXY", None, None, None, None, {})),
]

# header -> words the error must contain
BAD = [
    (b"EHLO client.example\r\n", "not a PROXY protocol header"),
    (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),       # a TLS ClientHello
    (b"\r\n\r\n\x00\r\nQUIX\n!\x11\x00\x00", "v2 signature"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone CR or LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n!", "past the end of the v1 header"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 025\r\n", "destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", "not ASCII"),
    (b"PROXY " + b"X" * 120, "no CRLF within 107"),
    (v2(ver=1, body=inet("1.2.3.4", "5.6.7.8", 1, 2)), "version 1"),
    (v2(cmd=2), "unknown command"),
    (v2(fam=0x41), "unknown address family"),
    (v2(fam=0x13, body=inet("1.2.3.4", "5.6.7.8", 1, 2)), "unknown transport"),
    (v2(body=b"\x01\x02\x03"), "cannot hold the 12-byte address block"),
    (v2(fam=0x21, body=inet("1.2.3.4", "5.6.7.8", 1, 2)), "cannot hold the 36-byte"),
    (v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00"), "stray bytes"),
    (v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x09abc"), "runs past the end"),
    (v2(length=MAX_V2_LENGTH + 1), f"at most {MAX_V2_LENGTH}"),
    (v2(length=0xFFFF), "65535 bytes"),
    (v2(body=b"") + b"EHLO", "past the end of the v2 header"),
]

# a prefix of a valid header: parse says truncated; bytes_needed asks for more
TRUNCATED = [
    b"", b"P", b"PROXY", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
    V2_SIGNATURE[:5], V2_SIGNATURE, v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2))[:20],
    v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(1, b"abc"))[:-1],
]


def _read_like_listener(stream: bytes) -> tuple[bytes, bytes]:
    """Read as the listener does: never more than bytes_needed asks for. Returns (header,
    what is left of the stream: the SMTP session)."""
    buf = b""
    while (n := bytes_needed(buf)) > 0:
        assert len(buf) + n <= len(stream), "asked for bytes the stream does not have"
        buf += stream[len(buf):len(buf) + n]
    return buf, stream[len(buf):]


@pytest.mark.parametrize("header,want", GOOD, ids=[repr(h[:24]) for h, _ in GOOD])
def test_valid_headers_parse_and_are_read_to_their_last_byte(header, want):
    h = parse(header)
    assert (h.version, h.command, h.address, h.port, h.dest_address, h.dest_port,
            h.tlvs) == want
    assert h.length == len(header)
    got, rest = _read_like_listener(header + b"EHLO x\r\n")
    assert got == header and rest == b"EHLO x\r\n"


def test_the_longest_v1_line_fits_the_limit():
    longest = GOOD[3][0]
    assert len(longest) <= 107


@pytest.mark.parametrize("header,words", BAD, ids=[repr(h[:24]) for h, _ in BAD])
def test_malformed_headers_are_refused_with_the_reason(header, words):
    with pytest.raises(ProxyProtocolError) as e:
        # fed as the listener reads: the error may come before the whole header is read
        buf = b""
        for i in range(len(header)):
            buf = header[:i + 1]
            bytes_needed(buf)
        parse(buf)
    assert words in str(e.value)


@pytest.mark.parametrize("prefix", TRUNCATED, ids=[repr(p[:24]) for p in TRUNCATED])
def test_a_truncated_header_asks_for_more_and_does_not_parse(prefix):
    assert bytes_needed(prefix) >= 1
    with pytest.raises(ProxyProtocolError, match="truncated header"):
        parse(prefix)


def test_an_oversize_v2_header_is_refused_before_its_body_is_read():
    # 16 bytes are enough to refuse: the listener never reads (or buffers) the 65535
    with pytest.raises(ProxyProtocolError, match="65535"):
        bytes_needed(v2(length=0xFFFF))


def test_v2_bytes_needed_asks_for_exactly_the_rest():
    h = v2(body=inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x02, b"mx.example"))
    assert bytes_needed(h[:3]) == 13
    assert bytes_needed(h[:16]) == len(h) - 16
    assert bytes_needed(h) == 0


# --------------------------------------------------------------------- [ingress] proxy keys
def _ingress(**kw):
    from cluster.config import parse_config
    base = {"auth": False, "submission": ["127.0.0.1:2587", "127.0.0.1:2588"]}
    return parse_config({"ingress": {**base, **kw}}).ingress


@pytest.mark.parametrize("kw,listeners,networks", [
    ({}, (), ()),
    ({"proxy_protocol": False}, (), ()),
    ({"proxy_protocol": True, "proxy_networks": ["10.0.0.7"]},
     ("127.0.0.1:2587", "127.0.0.1:2588"), ("10.0.0.7/32",)),
    ({"proxy_protocol": ["127.0.0.1:2588"], "proxy_networks": ["10.0.0.9/24", "fd00::/8"]},
     ("127.0.0.1:2588",), ("10.0.0.0/24", "fd00::/8")),
])
def test_proxy_config_names_the_listeners_and_networks(kw, listeners, networks):
    ing = _ingress(**kw)
    assert ing.proxy_protocol == listeners and ing.proxy_networks == networks
    assert ing.proxy_timeout == 10.0


@pytest.mark.parametrize("kw,key,words", [
    ({"proxy_protocol": True}, "ingress.proxy_networks", "source networks"),
    ({"proxy_networks": ["10.0.0.0/8"]}, "ingress.proxy_protocol", "no listener takes"),
    ({"proxy_protocol": True, "proxy_networks": ["10.0.0.300/8"]}, "ingress.proxy_networks[0]",
     "not a network"),
    ({"proxy_protocol": True, "proxy_networks": 10}, "ingress.proxy_networks", "expected a list"),
    ({"proxy_protocol": ["127.0.0.1:9"], "proxy_networks": ["10.0.0.0/8"]},
     "ingress.proxy_protocol[0]", "not one of ingress.submission"),
    ({"proxy_protocol": ["nowhere"], "proxy_networks": ["10.0.0.0/8"]},
     "ingress.proxy_protocol[0]", "host:port"),
    ({"proxy_protocol": True, "proxy_networks": ["10.0.0.0/8"], "proxy_timeout": "soon"},
     "ingress.proxy_timeout", "invalid duration"),
])
def test_bad_proxy_config_names_the_key(kw, key, words):
    from cluster.config import ConfigError
    with pytest.raises(ConfigError) as e:
        _ingress(**kw)
    assert e.value.key == key and words in e.value.problem, str(e.value)


def test_proxy_on_implicit_tls_and_http_listeners_and_networks_for_x_forwarded_for():
    from cluster.config import ConfigError, parse_config
    from cluster.core.submission import hash_api_key
    base = {"auth": False, "cert_file": "c.pem", "key_file": "k.pem",
            "submission": ["127.0.0.1:2587"], "submissions": ["127.0.0.1:2465"],
            "http": ["127.0.0.1:8080"],
            "api_key": [{"name": "k", "key_hash": hash_api_key("rmta_k_0123456789abcdef0123"),
                         "domains": ["a.test"]}]}
    ing = parse_config({"ingress": {**base, "proxy_protocol": ["127.0.0.1:2465",
                                                               "127.0.0.1:8080"],
                                    "proxy_networks": ["127.0.0.1"]}}).ingress
    assert ing.proxy_protocol == ("127.0.0.1:2465", "127.0.0.1:8080")
    # proxy_networks alone: the HTTP listeners believe X-Forwarded-For from them
    ing = parse_config({"ingress": {**base, "proxy_networks": ["10.0.0.0/8"]}}).ingress
    assert ing.proxy_protocol == () and ing.proxy_networks == ("10.0.0.0/8",)
    with pytest.raises(ConfigError) as e:
        parse_config({"ingress": {**base, "proxy_protocol": ["127.0.0.1:9"],
                                  "proxy_networks": ["127.0.0.1"]}})
    assert e.value.key == "ingress.proxy_protocol[0]"
    assert "not one of ingress.submission, ingress.submissions or ingress.http" in str(e.value)


# ------------------------------------------------------------ who may speak for a client
NETS = [ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize("ip,ok", [
    ("10.0.0.7", True), ("10.0.1.7", False), ("::ffff:10.0.0.7", True), ("fd00::1", True),
    ("fe80::1", False), ("not-an-ip", False), ("", False),
])
def test_only_the_balancers_networks_are_trusted(ip, ok):
    from cluster.core.proxy_protocol import trusted
    assert trusted(ip, NETS) is ok


@pytest.mark.parametrize("peer,xff,client", [
    ("10.0.0.7", ["198.51.100.4"], "198.51.100.4"),
    # the balancer appended the last address; the ones before are the client's own word
    ("10.0.0.7", ["203.0.113.5, 198.51.100.4"], "198.51.100.4"),
    ("10.0.0.7", ["203.0.113.5", "198.51.100.6"], "198.51.100.6"),     # two header lines
    ("10.0.0.7", ["203.0.113.5,[2001:db8::9]"], "2001:db8::9"),
    ("10.0.0.7", ["198.51.100.4, unknown"], "10.0.0.7"),              # not an address
    ("10.0.0.7", [], "10.0.0.7"),
    ("192.0.2.1", ["198.51.100.4"], "192.0.2.1"),                      # not a balancer
    (None, ["198.51.100.4"], None),
])
def test_x_forwarded_for_is_believed_only_from_a_balancer(peer, xff, client):
    from cluster.core.proxy_protocol import forwarded_client
    assert forwarded_client(peer, xff, NETS) == client
