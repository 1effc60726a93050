"""The PROXY protocol (HAProxy's, versions 1 and 2): the header a TCP load balancer sends first
on each connection it forwards, saying which client it is forwarding.

Pure: bytes in, a :class:`ProxyHeader` out; no sockets, no ``ray``. The listener reads with
:func:`bytes_needed` (how many more bytes it must read before the header can be parsed: never
more than the header holds, so not one byte of the SMTP session that follows is consumed) and
then calls :func:`parse`. Anything that is not a well-formed header raises
:class:`ProxyProtocolError` naming what is wrong; a listener that requires the header then
refuses the connection.

What the specification asks of a receiver, and what this module does:

- version 1 (text): ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n``, single spaces, at
  most 107 bytes with the CRLF; ``PROXY UNKNOWN`` (anything up to the CRLF ignored) means the
  proxy does not know the client: the connection's own addresses are used (``address is
  None``).
- version 2 (binary): the 12-byte signature, a version/command byte (version 2; command LOCAL
  or PROXY), a family/transport byte, a 16-bit length, then addresses and TLVs. LOCAL (the
  proxy's own health checks) carries no client: its address block is skipped and the
  connection's own addresses are used; so are those of a PROXY header whose family is
  UNSPEC or UNIX (nothing an IP limit could use). TLVs (type, 16-bit length, value) are
  returned by type; a TLV running past the header is an error.
- Bounded: a v2 header announcing more than :data:`MAX_V2_LENGTH` bytes is refused before
  any of it is read (a load balancer sends a few dozen bytes; TLVs add a few hundred).

Who may speak for a client: :func:`trusted` (a connection's own peer is one of the
balancers' networks) decides who may send a header, and :func:`forwarded_client` applies the
same rule to ``X-Forwarded-For`` behind an HTTP-mode balancer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ProxyProtocolError", "ProxyHeader", "V2_SIGNATURE", "MAX_V1_LENGTH",
           "MAX_V2_LENGTH", "bytes_needed", "forwarded_client", "parse", "trusted"]

#: the first 12 bytes of every version 2 header
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
#: a version 1 line, ``PROXY TCP6`` with two full IPv6 addresses and ports, with its CRLF
MAX_V1_LENGTH = 107
#: the most bytes after the 16-byte fixed part of a v2 header that a listener will read
MAX_V2_LENGTH = 1024

_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
#: bytes of the address block per family (two addresses and, for INET/INET6, two ports)
_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyProtocolError(ValueError):
    """Not a valid PROXY protocol header (the message says what is wrong)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header said.

    ``address``/``port``: the client (source) as the proxy saw it, ``None`` when the header
    carries none the listener can use (v1 UNKNOWN, v2 LOCAL, v2 UNSPEC or UNIX): then the
    connection's own peer is the client. ``length``: the header's size in bytes."""

    version: int
    command: str                       # "PROXY" or "LOCAL"
    address: str | None
    port: int | None
    dest_address: str | None
    dest_port: int | None
    length: int
    tlvs: dict[int, bytes] = field(default_factory=dict)


def bytes_needed(buf: bytes) -> int:
    """How many more bytes must be read before :func:`parse` can decide on ``buf``: 0 when
    ``buf`` holds a complete header (and nothing more), at least 1 otherwise. Raises
    :class:`ProxyProtocolError` as soon as ``buf`` cannot be the start of a header."""
    n = len(buf)
    if n == 0:
        return 1
    if buf[0] == V2_SIGNATURE[0]:
        k = min(n, len(V2_SIGNATURE))
        if buf[:k] != V2_SIGNATURE[:k]:
            raise ProxyProtocolError("not a PROXY protocol header: a binary header must start "
                                     "with the 12-byte v2 signature")
        if n < 16:
            return 16 - n
        length = struct.unpack_from("!H", buf, 14)[0]
        if length > MAX_V2_LENGTH:
            raise ProxyProtocolError(f"v2 header announces {length} bytes after its fixed "
                                     f"part; at most {MAX_V2_LENGTH} are accepted")
        total = 16 + length
        if n > total:
            raise ProxyProtocolError(f"{n - total} bytes past the end of the v2 header")
        return total - n
    k = min(n, len(_V1_PREFIX))
    if buf[:k] != _V1_PREFIX[:k]:
        raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_show(buf[:16])}")
    end = buf.find(b"\r\n")
    if end >= 0:
        if end + 2 != n:
            raise ProxyProtocolError(f"{n - end - 2} bytes past the end of the v1 header")
        return 0
    if n >= MAX_V1_LENGTH:
        raise ProxyProtocolError(f"v1 header has no CRLF within {MAX_V1_LENGTH} bytes")
    if b"\n" in buf or b"\r" in buf[:-1]:
        raise ProxyProtocolError("v1 header: a lone CR or LF (it must end with CRLF)")
    return 1


def parse(buf: bytes) -> ProxyHeader:
    """The header that is exactly ``buf`` (see :func:`bytes_needed`)."""
    need = bytes_needed(buf)
    if need:
        raise ProxyProtocolError(f"truncated header: {need} more bytes expected after "
                                 f"{len(buf)}")
    return _parse_v2(buf) if buf[0] == V2_SIGNATURE[0] else _parse_v1(buf)


def _show(b: bytes) -> str:
    return repr(b)[1:]


def _parse_v1(buf: bytes) -> ProxyHeader:
    try:
        line = buf[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header: not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # the rest of the line, whatever it is, is to be ignored
        return ProxyHeader(1, "PROXY", None, None, None, None, len(buf))
    if len(parts) != 6:
        raise ProxyProtocolError(f"v1 header: expected 'PROXY TCP4|TCP6 src dst sport dport', "
                                 f"got {line[:MAX_V1_LENGTH]!r}")
    _, proto, src, dst, sport, dport = parts
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header: unknown protocol {proto[:8]!r} (TCP4, TCP6 or "
                                 "UNKNOWN)")
    want = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    addrs = []
    for what, text in (("source", src), ("destination", dst)):
        try:
            addrs.append(want(text))
        except ValueError:
            raise ProxyProtocolError(f"v1 header: {what} address {text[:45]!r} is not an "
                                     f"{'IPv4' if proto == 'TCP4' else 'IPv6'} address") from None
    ports = [_v1_port(sport, "source"), _v1_port(dport, "destination")]
    return ProxyHeader(1, "PROXY", str(addrs[0]), ports[0], str(addrs[1]), ports[1], len(buf))


def _v1_port(text: str, what: str) -> int:
    # decimal, 0..65535, no sign and no leading zero
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyProtocolError(f"v1 header: {what} port {text[:8]!r} is not 0..65535")
    return int(text)


def _parse_v2(buf: bytes) -> ProxyHeader:
    ver_cmd, fam = buf[12], buf[13]
    version, command = ver_cmd >> 4, ver_cmd & 0xF
    if version != 2:
        raise ProxyProtocolError(f"v2 header: version {version} (only 2 exists)")
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"v2 header: unknown command {command:#x} (LOCAL or PROXY)")
    family, transport = fam >> 4, fam & 0xF
    if family not in _ADDRESS_BYTES:
        raise ProxyProtocolError(f"v2 header: unknown address family {family:#x}")
    if transport > 2:
        raise ProxyProtocolError(f"v2 header: unknown transport {transport:#x}")
    body = buf[16:]
    if command == _CMD_LOCAL:
        # the proxy's own connection (a health check): the address block, if any, is ignored
        return ProxyHeader(2, "LOCAL", None, None, None, None, len(buf))
    size = _ADDRESS_BYTES[family]
    if len(body) < size:
        raise ProxyProtocolError(f"v2 header: {len(body)} bytes cannot hold the "
                                 f"{size}-byte address block of family {family:#x}")
    src = dst = None
    sport = dport = None
    if family == _AF_INET:
        src, dst = str(ipaddress.IPv4Address(body[0:4])), str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack_from("!HH", body, 8)
    elif family == _AF_INET6:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack_from("!HH", body, 32)
    return ProxyHeader(2, "PROXY", src, sport, dst, dport, len(buf), _tlvs(body[size:]))


def _tlvs(b: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i < len(b):
        if len(b) - i < 3:
            raise ProxyProtocolError(f"v2 header: {len(b) - i} stray bytes where a TLV "
                                     "(3 bytes at least) should be")
        typ, n = b[i], struct.unpack_from("!H", b, i + 1)[0]
        if i + 3 + n > len(b):
            raise ProxyProtocolError(f"v2 header: TLV type {typ:#04x} of {n} bytes runs past "
                                     "the end of the header")
        out[typ] = bytes(b[i + 3:i + 3 + n])
        i += 3 + n
    return out


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted(ip: str, networks: Sequence[Network]) -> bool:
    """Whether ``ip`` (a connection's own peer; an IPv4-mapped IPv6 address counts as its
    IPv4 address) is in one of ``networks``, the load balancers'."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in n for n in networks)


def forwarded_client(peer: str | None, forwarded_for: Sequence[str],
                     networks: Sequence[Network]) -> str | None:
    """The client of an HTTP request: when ``peer`` is a trusted balancer, the last address of
    ``X-Forwarded-For`` (the one the balancer itself appended; those before it are the
    client's own word) if it is an IP address; else ``peer``. ``forwarded_for``: every
    X-Forwarded-For header line, in order."""
    if peer is None or not forwarded_for or not trusted(peer, networks):
        return peer
    last = ",".join(forwarded_for).split(",")[-1].strip()
    try:
        return str(ipaddress.ip_address(last.strip("[]")))
    except ValueError:
        return peer
