"""DKIM signatures per second per core: raymta's signer against dkimpy's, in one run.

One thread, one process, so the figures are per core. Each case signs ~2 KB messages
(bench/common.py's workload: distinct headers per message) for ``--seconds`` and counts CPU
seconds of this process (``time.process_time``) as well as wall time. raymta's cases include
everything the relay does per message: wire form, header parsing, From-domain lookup,
canonicalisation of headers and body, SHA-256 of the body, the signature header and its
folding. ``fresh body`` cases hash every body (cache off); ``shared body`` cases let the body
cache work the way it does for a message with several recipients. ``openssl floor`` is the
bare RSA-2048 PKCS#1 v1.5 signature through ``cryptography`` on 300 bytes: no signer can beat
it on this CPU.

    python bench/dkim_sign.py [--seconds 3] [--size 2048]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, make_workload, write_result

__all__ = ["main", "run"]


def _rate(fn: Callable[[int], Any], seconds: float) -> dict[str, float]:
    n = 0
    c0, w0 = time.process_time(), time.perf_counter()
    while True:
        for _ in range(20):
            fn(n)
            n += 1
        cpu = time.process_time() - c0
        if cpu >= seconds:
            break
    wall = time.perf_counter() - w0
    return {"signatures": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "per_cpu_second": round(n / cpu, 1), "us_per_signature": round(cpu / n * 1e6, 1)}


def run(seconds: float = 3.0, size: int = 2048, dkimpy: bool = True) -> dict[str, Any]:
    import dkim
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    from cluster.adapters.dkim_keys import KeyRing, KeySource, Signer, dns_record

    wl = make_workload(2000, size=size)
    raws = [m["raw"] for m in wl.messages]
    domain = "origin.bench.test"
    tmp = Path(tempfile.mkdtemp(prefix="dkim-bench-"))
    rk = rsa.generate_private_key(65537, 2048)
    ek = ed25519.Ed25519PrivateKey.generate()
    rpem = rk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (tmp / "r.pem").write_bytes(rpem)
    (tmp / "e.pem").write_bytes(ek.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    rsrc = KeySource(domain, "r", "rsa", str(tmp / "r.pem"))
    esrc = KeySource(domain, "e", "ed25519", str(tmp / "e.pem"))
    records = {f"r._domainkey.{domain}": dns_record(rk), f"e._domainkey.{domain}": dns_record(ek)}

    def signer(*srcs: KeySource, cache: bool) -> Signer:
        return Signer(KeyRing(lambda: list(srcs)), body_cache=4096 if cache else 0)

    now = time.time()
    cases: dict[str, dict[str, float]] = {}
    n_raw = len(raws)
    # distinct bodies for the "fresh body" cases: a per-message line at the end of the body
    fresh = [r + f"unique {i}\r\n".encode() for i, r in enumerate(raws)]

    s = signer(rsrc, cache=False)
    cases["raymta rsa-2048, fresh body"] = _rate(lambda i: s.sign(fresh[i % n_raw], now), seconds)
    s = signer(rsrc, cache=True)
    cases["raymta rsa-2048, shared body"] = _rate(lambda i: s.sign(raws[i % n_raw], now), seconds)
    s = signer(esrc, cache=False)
    cases["raymta ed25519, fresh body"] = _rate(lambda i: s.sign(fresh[i % n_raw], now), seconds)
    s = signer(rsrc, esrc, cache=False)
    dual = _rate(lambda i: s.sign(fresh[i % n_raw], now), seconds)
    # counted in messages: each carries two signatures (rsa-sha256 + ed25519-sha256)
    dual["signatures"] *= 2
    dual["messages_per_cpu_second"] = dual["per_cpu_second"]
    dual["per_cpu_second"] = round(dual["signatures"] / dual["cpu_s"], 1)
    dual["us_per_signature"] = round(dual["cpu_s"] / dual["signatures"] * 1e6, 1)
    cases["raymta rsa-2048 + ed25519 (dual), fresh body"] = dual
    pad, sha = padding.PKCS1v15(), hashes.SHA256()
    data = b"x" * 300
    cases["openssl floor: bare rsa-2048 sign"] = _rate(lambda i: rk.sign(data, pad, sha), seconds)
    if dkimpy:
        seed = base64.b64encode(ek.private_bytes(serialization.Encoding.Raw,
                                                 serialization.PrivateFormat.Raw,
                                                 serialization.NoEncryption()))
        hdrs = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                b"content-type"]
        cases["dkimpy rsa-2048 (pure-Python RSA)"] = _rate(
            lambda i: dkim.sign(fresh[i % n_raw], b"r", domain.encode(), rpem,
                                include_headers=hdrs), seconds)
        cases["dkimpy ed25519 (PyNaCl)"] = _rate(
            lambda i: dkim.sign(fresh[i % n_raw], b"e", domain.encode(), seed,
                                include_headers=hdrs, signature_algorithm=b"ed25519-sha256"),
            seconds)
    # the output is checked, not just timed
    out = signer(rsrc, esrc, cache=False).sign(raws[0], now)
    d = dkim.DKIM(out)
    verified = [bool(d.verify(idx=i, dnsfunc=lambda n, timeout=5: records[
        n.decode().rstrip(".")].encode())) for i in range(2)]
    ours = cases["raymta rsa-2048, fresh body"]["per_cpu_second"]
    res: dict[str, Any] = {
        "bench": "dkim_sign", "message_bytes": len(raws[0]), "seconds_per_case": seconds,
        "cases": cases, "dkimpy_verifies_our_output": verified,
        "rsa_speedup_over_dkimpy": round(ours / cases["dkimpy rsa-2048 (pure-Python RSA)"]
                                         ["per_cpu_second"], 1) if dkimpy else None,
        "rsa_share_of_openssl_floor": round(ours / cases["openssl floor: bare rsa-2048 sign"]
                                            ["per_cpu_second"], 3),
        "target_rsa_per_core": 2500, "target_met": ours >= 2500,
        "machine": machine_info()}
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per case")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("--no-dkimpy", action="store_true", help="skip dkimpy's (slow) cases")
    args = ap.parse_args(argv)
    res = run(args.seconds, args.size, dkimpy=not args.no_dkimpy)
    w = max(len(k) for k in res["cases"])
    print(f"DKIM signing, {res['message_bytes']}-byte messages, one core")
    print(f"{'case':<{w}}  {'sig/CPU-s':>10}  {'µs/sig':>8}")
    for k, c in res["cases"].items():
        print(f"{k:<{w}}  {c['per_cpu_second']:>10,.0f}  {c['us_per_signature']:>8.1f}")
    print(f"dkimpy verifies our dual-signed output: {res['dkimpy_verifies_our_output']}")
    print(f"raymta rsa-2048 vs dkimpy: x{res['rsa_speedup_over_dkimpy']}; "
          f"{res['rsa_share_of_openssl_floor']:.0%} of the bare OpenSSL signature rate; "
          f"target 2,500/s met: {res['target_met']}")
    path = write_result("dkim_sign", res)
    print(f"wrote {path}")
    print(json.dumps({k: v["per_cpu_second"] for k, v in res["cases"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
