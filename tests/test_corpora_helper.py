"""The corpora helper of tests/conftest.py: where tests find ../shared/corpora, and what they do
when it is absent (skip with a reason saying how to get it; fail when CI requires it)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.conftest as conftest


@pytest.mark.parametrize("require, outcome", [
    ("", pytest.skip.Exception),
    ("0", pytest.skip.Exception),
    ("1", pytest.fail.Exception),
])
def test_a_missing_corpus_skips_with_a_how_to_or_fails_when_required(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require: str, outcome: type) -> None:
    monkeypatch.setattr(conftest, "CORPORA", tmp_path / "nowhere")
    monkeypatch.setenv("RAYMTA_REQUIRE_CORPORA", require)
    with pytest.raises(outcome, match="Set RAYMTA_CORPORA") as info:
        conftest.corpus("smtp_replies.csv")
    assert str(tmp_path / "nowhere" / "smtp_replies.csv") in str(info.value)
    assert "check out shared/ beside the repository" in str(info.value)


def test_a_present_corpus_is_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mx").mkdir()
    monkeypatch.setattr(conftest, "CORPORA", tmp_path)
    monkeypatch.setenv("RAYMTA_REQUIRE_CORPORA", "1")
    assert conftest.corpus("mx") == tmp_path / "mx"


def test_ci_requires_the_corpora() -> None:
    ci = (conftest.REPO_ROOT / ".ci" / "run").read_text()
    assert "RAYMTA_REQUIRE_CORPORA=1" in ci
