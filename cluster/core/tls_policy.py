"""TLS policy for outbound SMTP: which CA verifies a site, which hosts' TLS is broken, and the
words of a TLS failure.

Role: the pure half of the relay's STARTTLS policy (``cluster.adapters.smtp`` does the I/O).
- opportunistic (RFC 7435, Postfix ``may``): STARTTLS when offered; a handshake that fails is
  retried in plaintext on the same host, and :class:`BrokenTls` remembers the host for a while
  so the next connections go straight to plaintext;
- required (Postfix ``verify``/``secure``): the certificate chain and the MX host name are
  verified (RFC 6125 via the ``ssl`` module), with the system CAs or a CA file per site
  (:func:`ca_file_for`); a failure is a transient, classified error (:func:`verify_text`),
  never a plaintext fallback.
Pure: no sockets, no clock (``now`` is an argument), no Ray.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cluster.core.sites import SiteOverride

__all__ = ["BrokenTls", "ca_file_for", "mta_sts_applies", "site_override", "tls_server_name",
           "verify_text"]

#: OpenSSL X509_V_ERR_* codes operators recognise, as a short reason
_VERIFY_REASONS = {
    62: "hostname mismatch",            # X509_V_ERR_HOSTNAME_MISMATCH
    64: "IP address mismatch",          # X509_V_ERR_IP_ADDRESS_MISMATCH
    10: "certificate expired",          # X509_V_ERR_CERT_HAS_EXPIRED
    9: "certificate not yet valid",
    18: "self-signed certificate",      # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "self-signed CA in chain",
    20: "unknown CA",                   # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown CA",                   # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}


class BrokenTls:
    """MX hosts whose STARTTLS handshake failed, until ``now + ttl``. Bounded: the least
    recently marked host goes first when ``max_hosts`` are remembered."""

    def __init__(self, ttl: float, max_hosts: int = 4096) -> None:
        self.ttl = ttl
        self.max_hosts = max_hosts
        self._until: OrderedDict[str, float] = OrderedDict()

    def mark(self, host: str, now: float) -> None:
        self._until.pop(host, None)
        self._until[host] = now + self.ttl
        while len(self._until) > self.max_hosts:
            self._until.popitem(last=False)

    def is_broken(self, host: str, now: float) -> bool:
        until = self._until.get(host)
        if until is None:
            return False
        if now >= until:
            del self._until[host]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


def site_override(site: str, hosts: Sequence[str], overrides: Sequence[SiteOverride]
                  ) -> SiteOverride | None:
    """The [[site]] override that made ``site`` (a key from
    :func:`cluster.core.sites.site_for`) whose MX host names are ``hosts``, or None. Mirrors
    ``site_for``: a domain override makes the site ``domain:<name>``; an MX-suffix override
    applies when a host matches it."""
    if site.startswith("domain:"):
        domain = site[len("domain:"):]
        return next((o for o in overrides if o.domain == domain), None)
    names = [h.lower().rstrip(".") for h in hosts]
    for o in overrides:
        if o.mx_suffix:
            suffix = o.mx_suffix.lstrip(".*")
            if any(h == suffix or h.endswith("." + suffix) for h in names):
                return o
    return None


def ca_file_for(site: str, hosts: Sequence[str], overrides: Sequence[SiteOverride],
                default: str = "") -> str:
    """The CA file for ``site`` whose MX host names are ``hosts``: the [[site]] override that
    made this site, if it names a CA file, else ``default`` ("" = the system CAs)."""
    o = site_override(site, hosts, overrides)
    return (o.tls_ca_file if o is not None else "") or default


def mta_sts_applies(site: str, hosts: Sequence[str], overrides: Sequence[SiteOverride],
                    tls: str) -> bool:
    """Whether recipient domains' MTA-STS policies govern ``site``: its TLS is the default
    opportunistic one and no [[site]] entry sets ``tls`` for it (an operator's explicit
    choice wins over what a domain publishes), and it is reached through MX records (not an
    address literal nor a [routes] smart host)."""
    if tls != "opportunistic" or site.startswith(("[", "route:")):
        return False
    o = site_override(site, hosts, overrides)
    return o is None or not o.tls_set


def tls_server_name(host: str) -> str:
    """The name a certificate must match: the MX host name, or the address of an address
    literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        return inner[5:] if inner[:5].lower() == "ipv6:" else inner
    return host


def verify_text(host: str, address: str, verify_message: str, verify_code: int | None) -> str:
    """"TLS required: certificate verify failed: <OpenSSL's words> for mx.example [addr]
    (hostname mismatch)"."""
    why = _VERIFY_REASONS.get(verify_code or -1)
    msg = (verify_message or "certificate verify failed").rstrip(".")
    return (f"TLS required: certificate verify failed: {msg} for {host} [{address}]"
            + (f" ({why})" if why else ""))
