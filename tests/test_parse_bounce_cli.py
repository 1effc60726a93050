"""``raymta parse-bounce FILE... --json`` over every file of the bounce and ARF corpora: one JSON
object per file with the documented keys, never a crash, and the fields that the manifests and
upstream snapshots state agree."""

from __future__ import annotations

import csv
import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

from cluster.cli import main
from cluster.core.dsn import CONTRACT_KEYS, KINDS
from tests.conftest import CORPORA, corpus


def _run(files: list[Path]) -> dict[str, dict[str, object]]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["parse-bounce", "--json", *map(str, files)])
    assert rc == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == len(files), "one JSON object per file"
    objs = [json.loads(line) for line in lines]
    for o in objs:
        assert tuple(o) == CONTRACT_KEYS and o["kind"] in KINDS, o
    return {str(Path(str(o["file"])).relative_to(CORPORA)): o for o in objs}


def _agree(name: str, pairs: list[tuple[object, object, str]]) -> float:
    ok = sum(1 for want, got, _ in pairs if want == got)
    print(f"\n{name}: {ok}/{len(pairs)} agree")
    for want, got, where in pairs:
        if want != got:
            print(f"  {where}: expected {want!r}, got {got!r}")
    return ok / len(pairs)


def test_every_bounce_and_arf_file_gives_one_json_object_and_manifest_fields_agree():
    files = sorted(p for sub in ("bounces", "arf") for p in corpus(sub).rglob("*.eml"))
    assert len(files) > 400
    got = _run(files)

    # bounce manifest: recipients where the upstream states them with confidence
    rcpts, kinds = [], []
    with corpus("bounces", "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        o = got[row["file"]]
        if row["recipient_index"] == "1":
            want = "arf" if row["expected_class"] == "complaint" else \
                "dsn" if row["expected_is_bounce"] == "yes" else None
            if want:
                kinds.append((want, o["kind"], row["file"]))
        if row["expected_recipient"] and row["recipient_confidence"].startswith(("high",
                                                                                 "upstream")):
            listed = {str(r["recipient"]).lower() for r in o["recipients"]}  # type: ignore
            kinds_ok = row["expected_recipient"].lower() in listed
            rcpts.append((True, kinds_ok, f"{row['file']} {row['expected_recipient']}"))
    assert _agree("bounce manifest: expected recipient among those parsed", rcpts) >= 0.95
    assert _agree("bounce manifest: kind (dsn or arf)", kinds) >= 0.95

    # ARF manifest: every extracted field the manifest gives
    fields = []
    with corpus("arf", "manifest.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            o = got[f"arf/{row['file']}"]
            fields.append(("arf", o["kind"], row["file"]))
            if row["extracted_feedback_type"]:
                fields.append((row["extracted_feedback_type"], o["feedback_type"], row["file"]))
            if row["extracted_original_rcpt_to"]:
                fields.append((row["extracted_original_rcpt_to"].strip("<>"), o["recipient"],
                               row["file"]))
    assert _agree("arf manifest: kind, feedback type, recipient", fields) == 1.0

    # KumoMTA's RFC 3464 snapshots: first recipient's fields
    snap_fields = []
    for snap in sorted(corpus("bounces", "kumomta_rfc3464").glob("*.expected_snapshot.txt")):
        text = snap.read_text()
        o = got[f"bounces/kumomta_rfc3464/{snap.name.removesuffix('.expected_snapshot.txt')}"]
        if text.strip().endswith("None"):
            continue
        rcpt = re.search(r"final_recipient: Recipient \{\s*recipient_type: \"[^\"]*\",\s*"
                         r"recipient: \"([^\"]*)\"", text)
        action = re.search(r"action: (\w+)", text)
        status = re.search(r"class: (\d),\s*subject: (\d+),\s*detail: (\d+)", text)
        diag = re.search(r"diagnostic_code: Some\(\s*DiagnosticCode \{\s*diagnostic_type: "
                         r"\"[^\"]*\",\s*diagnostic: \"((?:[^\"\\]|\\.)*)\"", text)
        mta = re.search(r"remote_mta: Some\(\s*RemoteMta \{\s*mta_type: \"[^\"]*\",\s*"
                        r"name: \"([^\"]*)\"", text)
        where = snap.name
        if rcpt:
            snap_fields.append((rcpt[1], o["recipient"], where + " recipient"))
        if action:
            snap_fields.append((action[1].lower(), o["action"], where + " action"))
        if status:
            snap_fields.append((".".join(status.groups()), o["status"], where + " status"))
        snap_fields.append((" ".join(diag[1].split()) if diag else None, o["diagnostic"],
                            where + " diagnostic"))
        snap_fields.append((mta[1] if mta else None, o["remote_mta"], where + " remote_mta"))
    assert len(snap_fields) > 20
    assert _agree("KumoMTA RFC 3464 snapshots: recipient, action, status, diagnostic, "
                  "remote MTA", snap_fields) >= 0.95


def test_unreadable_files_are_reported_not_fatal(tmp_path: Path):
    junk = tmp_path / "junk.eml"
    junk.write_bytes(b"\xff\xfe\x00garbage")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["parse-bounce", "--json", str(junk), str(tmp_path / "missing.eml")]) == 0
    a, b = (json.loads(line) for line in out.getvalue().splitlines())
    assert a["kind"] == "unknown" and a["reason"]
    assert b["kind"] == "unknown" and "cannot read" in b["reason"]
