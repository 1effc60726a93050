"""VERP return paths with an HMAC tag (cluster.core.verp): round trips, rotation, forgeries."""

from __future__ import annotations

import pytest

from cluster.core.verp import MAC_CHARS, VerpError, VerpKeys, decode, encode

MID = "01JDXK5Q7Z8YB6V3N2M1P0QRST"
OTHER = "01JDXK5Q7Z8YB6V3N2M1P0QRSV"
K1, K2 = b"k" * 32, b"q" * 32
OLD = VerpKeys("k1", {"k1": K1})                 # before rotation
ROTATED = VerpKeys("k2", {"k1": K1, "k2": K2})   # k2 signs, k1 still accepted
RETIRED = VerpKeys("k2", {"k2": K2})             # k1 removed
ARGS = {"prefix": "b", "domain": "bounce.example.com"}


def test_round_trip_and_format() -> None:
    addr = encode(MID, OLD, **ARGS)
    prefix, tag, mid = addr.split("@")[0].split("-")
    assert (prefix, mid, addr.split("@")[1]) == ("b", MID.lower(), "bounce.example.com")
    assert tag.startswith("k1") and len(tag) == 2 + MAC_CHARS
    r = decode(addr, OLD, **ARGS)
    assert (r.ok, r.message_id, r.key_id, r.reason) == (True, MID, "k1", None)
    assert encode(MID, OLD, **ARGS) == addr                       # deterministic
    assert encode(OTHER, OLD, **ARGS).split("-")[1] != tag        # the tag depends on the id


def _flip(addr: str, index: int) -> str:
    c = addr[index]
    return addr[:index] + ("b" if c != "b" else "c") + addr[index + 1:]


GOOD = encode(MID, OLD, **ARGS)
TAG_AT = GOOD.index("-") + 3            # inside the MAC
ID_AT = GOOD.rindex("-") + 5            # inside the message id

CASES = [
    # (name, address, keys, ok, reason fragment)
    ("as issued", GOOD, OLD, True, None),
    ("upper case and brackets", f"<{GOOD.upper()}>", OLD, True, None),
    ("old key still accepted after rotation", GOOD, ROTATED, True, None),
    ("new key signs after rotation", encode(MID, ROTATED, **ARGS), ROTATED, True, None),
    ("retired key refused", GOOD, RETIRED, False, "unknown key"),
    ("altered MAC", _flip(GOOD, TAG_AT), OLD, False, "bad tag"),
    ("altered message id", _flip(GOOD, ID_AT), OLD, False, "bad tag"),
    ("tag moved to another id", GOOD.replace(MID.lower(), OTHER.lower()), OLD, False, "bad tag"),
    ("signed by another secret", encode(MID, VerpKeys("k1", {"k1": b"x" * 32}), **ARGS), OLD,
     False, "bad tag"),
    ("key id swapped", GOOD.replace("-k1", "-k2", 1), ROTATED, False, "bad tag"),
    # the MAC has a fixed length: a shortened tag shifts "1" of the key id into the MAC
    ("truncated tag", GOOD.replace(GOOD.split("-")[1], GOOD.split("-")[1][:-1]), OLD, False,
     "malformed"),
    ("no tag", f"b-{MID.lower()}@bounce.example.com", OLD, False, "malformed"),
    ("not a ULID", GOOD.replace(MID.lower(), "hello"), OLD, False, "malformed"),
    ("wrong domain", GOOD.replace("bounce.example.com", "evil.example"), OLD, False,
     "wrong domain"),
    ("wrong prefix", "x" + GOOD[1:], OLD, False, "wrong prefix"),
    ("no at sign", "postmaster", OLD, False, "malformed"),
    ("empty", "", OLD, False, "malformed"),
    ("huge", "a" * 5000 + "@bounce.example.com", OLD, False, "malformed"),
    ("garbage tag", f"b-k1!!!!!!!!!!-{MID.lower()}@bounce.example.com", OLD, False, "malformed"),
]


@pytest.mark.parametrize("name, address, keys, ok, reason", CASES, ids=[c[0] for c in CASES])
def test_decode_accepts_only_what_a_current_key_signed(name, address, keys, ok, reason) -> None:
    r = decode(address, keys, **ARGS)
    assert r.ok is ok, r
    if ok:
        assert r.message_id == MID and r.reason is None
    else:
        assert r.message_id is None and reason in (r.reason or ""), r


@pytest.mark.parametrize("build", [
    lambda: VerpKeys("k9", {"k1": K1}),              # current key missing
    lambda: VerpKeys("K1", {"K1": K1}),              # bad key id
    lambda: VerpKeys("k1", {"k1": b"short"}),        # short secret
    lambda: encode("not-an-id", OLD, **ARGS),
    lambda: encode(MID, OLD, prefix="-x", domain="bounce.example.com"),
    lambda: encode(MID, OLD, prefix="b", domain="no spaces.example"),
])
def test_bad_arguments_raise_verp_error(build) -> None:
    with pytest.raises(VerpError):
        build()


def test_keys_do_not_show_their_secrets() -> None:
    assert "kkkk" not in repr(OLD)
