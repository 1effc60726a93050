"""Sandboxed per-recipient templates as a table: what renders, and what fails with the part and
the line named (the sandbox, undefined variables, header injection, runaway output)."""

from __future__ import annotations

import time

import pytest

from cluster.core.templates import MAX_OUTPUT, MessageTemplate, TemplateError


def test_each_part_renders_per_recipient_and_html_escapes():
    t = MessageTemplate(subject="Hello {{ name }}", text="Dear {{ name }},\n{{ n + 1 }}\n",
                        html="<p>{{ name }}</p>")
    assert t.render({"name": "<Ann>", "n": 1}) == {
        "subject": "Hello <Ann>", "text": "Dear <Ann>,\n2\n", "html": "<p>&lt;Ann&gt;</p>"}
    assert MessageTemplate(text="only text").render({}) == {"text": "only text"}


@pytest.mark.parametrize("parts,variables,field,line,words", [
    ({"text": "ok\n{% for x in %}"}, {}, "text", 2, "Expected an expression"),
    ({"html": "<p>\n\n{{ name }</p>"}, {}, "html", 3, "unexpected"),
    ({"text": "a\n{{ missing }}"}, {}, "text", 2, "'missing' is undefined"),
    ({"text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, {}, "text", 1,
     "not allowed in the sandbox"),
    ({"text": "x\n{{ f.__globals__ }}"}, {"f": lambda: 0}, "text", 2, "unsafe"),
    ({"subject": "{{ s }}"}, {"s": "Hi\r\nBcc: victim@example.net"}, "subject", None,
     "line break"),
    ({"text": "{% for i in range(10**9) %}{% endfor %}"}, {}, "text", 1, "Range too big"),
    ({"text": "{{ 'x' * n }}"}, {"n": MAX_OUTPUT + 1}, "text", None, "over the limit"),
    ({"text": "1\n2\n{{ 1 // z }}"}, {"z": 0}, "text", 3, "ZeroDivisionError"),
    ({"subject": 42}, {}, "subject", None, "must be a string"),
])
def test_failures_name_the_part_and_line(parts, variables, field, line, words):
    with pytest.raises(TemplateError) as e:
        MessageTemplate(**parts).render(variables)
    assert (e.value.field, e.value.line) == (field, line), str(e.value)
    assert words in str(e.value)


def test_variables_must_be_an_object():
    with pytest.raises(TemplateError) as e:
        MessageTemplate(text="x").render(["not", "a", "dict"])
    assert e.value.field == "variables"


def test_renders_per_second_for_a_typical_template():
    t = MessageTemplate(subject="Your order {{ order.id }}, {{ name }}",
                        text="Hello {{ name }},\n\n{% for item in order['items'] %}- {{ item }}\n"
                             "{% endfor %}\nTotal: {{ order.total }}\n",
                        html="<p>Hello {{ name }}</p><ul>{% for item in order['items'] %}"
                             "<li>{{ item }}</li>{% endfor %}</ul>")
    v = {"name": "Ann", "order": {"id": 17, "total": "12.50", "items": ["tea", "cake"]}}
    n = 2000
    t0 = time.process_time()
    for _ in range(n):
        t.render(v)
    rate = n / max(1e-9, time.process_time() - t0)
    print(f"\n{rate:,.0f} renders/s (CPU time, one core)")
    assert rate > 1000     # a floor that only a broken sandbox setup would miss


def test_per_recipient_renders_one_submission_each_and_fails_as_a_whole():
    from cluster.core.templates import per_recipient, recipient_variables
    msg = {"from": "News <news@example.com>", "subject": "Hi {{ name }}",
           "text": "Dear {{ name }}\n", "tags": {"c": "x"}, "template": True}
    pairs = recipient_variables(["a@example.net",
                                 {"address": "b@example.net", "variables": {"name": "Bo"}}])
    assert pairs == [("a@example.net", {}), ("b@example.net", {"name": "Bo"})]
    with pytest.raises(TemplateError) as e:      # 'name' undefined for the first: none made
        per_recipient(msg, pairs)
    assert (e.value.field, e.value.line) == ("subject", 1)
    pairs[0] = ("a@example.net", {"name": "Al"})
    subs = per_recipient(msg, pairs)
    assert subs == [
        {"from": "News <news@example.com>", "tags": {"c": "x"}, "recipients": ["a@example.net"],
         "to": "a@example.net", "subject": "Hi Al", "text": "Dear Al\n"},
        {"from": "News <news@example.com>", "tags": {"c": "x"}, "recipients": ["b@example.net"],
         "to": "b@example.net", "subject": "Hi Bo", "text": "Dear Bo\n"}]
    assert per_recipient({**msg, "to": "List <l@example.com>"}, pairs[:1])[0]["to"] == \
        "List <l@example.com>"


@pytest.mark.parametrize("recipients, field", [
    ([], "recipients"), ("a@example.net", "recipients"), ([{"variables": {}}], "recipients[0]"),
    (["a@example.net", 7], "recipients[1]")])
def test_recipient_variables_name_the_bad_entry(recipients, field):
    from cluster.core.templates import recipient_variables
    with pytest.raises(TemplateError) as e:
        recipient_variables(recipients)
    assert e.value.field == field
