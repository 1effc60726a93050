"""Per-recipient message templates: subject, text and HTML rendered with sandboxed Jinja2.

Owns turning a message's templates and one recipient's variables into the subject, text and
HTML of that recipient's copy, at the ingress or the client (never in a queue leader). The
sandbox (``jinja2.sandbox.SandboxedEnvironment``) refuses attribute access outside it
(``''.__class__``), ``range`` is capped by Jinja2 (100,000), undefined variables are errors,
HTML autoescapes, the output is bounded, and a subject may not render to a line break (header
injection through a variable). Every failure is a :class:`TemplateError` naming the part and the
line: the caller fails that message, never the batch.

Pure apart from Jinja2 (the one library this core module uses, by design: the issue asks for
its sandbox): no I/O, no clock.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Mapping

import jinja2
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["TemplateError", "MessageTemplate", "PARTS", "MAX_OUTPUT", "per_recipient",
           "recipient_variables"]

#: the parts a template may have, in order
PARTS = ("subject", "text", "html")
#: most characters one part may render to (a loop over a big list must not eat memory)
MAX_OUTPUT = 2_000_000


class TemplateError(ValueError):
    """``part``: line ``line``: ``problem`` (``field`` is the part's name, as the API names it)."""

    def __init__(self, part: str, line: int | None, problem: str) -> None:
        where = f"{part}: line {line}" if line else part
        super().__init__(f"{where}: {problem}")
        self.field = part
        self.line = line
        self.problem = problem


def _env(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=autoescape,
                                keep_trailing_newline=True)


_TEXT_ENV = _env(False)
_HTML_ENV = _env(True)


def _runtime_line(e: BaseException) -> int | None:
    """The template line a runtime error came from (Jinja2 rewrites the traceback so that the
    template's own frame, file ``<template>``, carries it)."""
    line = None
    for fr in traceback.extract_tb(e.__traceback__):
        if fr.filename == "<template>":
            line = fr.lineno
    return line


@dataclass(frozen=True)
class MessageTemplate:
    """Compiled templates for the parts given (None: the part is absent)."""

    subject: str | None = None
    text: str | None = None
    html: str | None = None

    def __post_init__(self) -> None:
        compiled: dict[str, Any] = {}
        for part in PARTS:
            src = getattr(self, part)
            if src is None:
                continue
            if not isinstance(src, str):
                raise TemplateError(part, None, f"must be a string, not {type(src).__name__}")
            env = _HTML_ENV if part == "html" else _TEXT_ENV
            try:
                compiled[part] = env.from_string(src)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(part, e.lineno, e.message or "syntax error") from None
        object.__setattr__(self, "_compiled", compiled)

    def render(self, variables: Mapping[str, Any]) -> dict[str, str]:
        """The rendered parts for one recipient's ``variables``."""
        if not isinstance(variables, Mapping):
            raise TemplateError("variables", None, "must be an object of name: value")
        out: dict[str, str] = {}
        for part, tpl in self._compiled.items():   # type: ignore[attr-defined]
            try:
                text = tpl.render(dict(variables))
            except jinja2.TemplateError as e:   # undefined, security, runtime
                kind = "not allowed in the sandbox" if isinstance(
                    e, jinja2.exceptions.SecurityError) else ""
                msg = e.message or type(e).__name__
                raise TemplateError(part, _runtime_line(e),
                                    f"{msg} ({kind})" if kind else msg) from None
            except (OverflowError, MemoryError, RecursionError, TypeError, ValueError,
                    ZeroDivisionError) as e:
                raise TemplateError(part, _runtime_line(e),
                                    f"{type(e).__name__}: {e}") from None
            if len(text) > MAX_OUTPUT:
                raise TemplateError(part, None, f"renders to {len(text)} characters, over the "
                                    f"limit of {MAX_OUTPUT}")
            if part == "subject" and ("\r" in text or "\n" in text):
                raise TemplateError(part, None, "renders to a line break (a header field "
                                    "cannot hold one: header injection through a variable?)")
            out[part] = text
        return out


def recipient_variables(recipients: object, field: str = "recipients"
                        ) -> list[tuple[str, Any]]:
    """(address, variables) for each of a templated message's recipients: an address, or
    ``{"address": ..., "variables": {...}}``. :class:`TemplateError` names the entry that is
    neither."""
    if not isinstance(recipients, (list, tuple)) or not recipients:
        raise TemplateError(field, None, "a non-empty list")
    out: list[tuple[str, Any]] = []
    for j, r in enumerate(recipients):
        if isinstance(r, str):
            out.append((r, {}))
        elif isinstance(r, dict) and isinstance(r.get("address"), str):
            out.append((r["address"], r.get("variables", {})))
        else:
            raise TemplateError(f"{field}[{j}]", None,
                                'an address or {"address", "variables"}')
    return out


def per_recipient(message: Mapping[str, Any], recipients: list[tuple[str, Any]]
                  ) -> list[dict[str, Any]]:
    """One submission per recipient: ``message`` (without its recipients) with subject, text
    and html rendered from that recipient's variables, ``recipients=[address]``, and a To
    field naming the recipient unless the message gives its own. The first failure raises
    :class:`TemplateError` (the part and line): the message fails as a whole, never half of
    its recipients. Rendered where the message is submitted (the HTTP ingress, the Python
    client), never in a queue leader."""
    tpl = MessageTemplate(**{p: message.get(p) for p in PARTS})
    base = {k: v for k, v in message.items() if k not in ("recipients", "template", *PARTS)}
    out = []
    for addr, variables in recipients:
        sub = dict(base, recipients=[addr], **tpl.render(variables))
        sub.setdefault("to", addr)
        out.append(sub)
    return out
