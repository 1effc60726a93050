"""The OpenAPI 3.1 document of the HTTP API (served at ``/v1/openapi.json``; the copy in
``docs/openapi.json`` is written from here and a test keeps the two equal).

Owns the description of the API only: what ``cluster/ingress_http.py`` serves must match it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document() -> dict[str, Any]:
    recipient = {"oneOf": [
        {"type": "string", "description": "an address"},
        {"type": "object", "required": ["address"], "additionalProperties": False,
         "properties": {"address": {"type": "string"},
                        "variables": {"type": "object",
                                      "description": "template variables for this recipient"}}}]}
    message = {
        "type": "object", "required": ["from", "recipients"], "additionalProperties": False,
        "properties": {
            "from": {"type": "string", "description": "From header; its domain must be one "
                     "of the API key's"},
            "sender": {"type": "string", "description": "envelope sender (default: from)"},
            "recipients": {"type": "array", "minItems": 1, "maxItems": 1000,
                           "items": recipient},
            "to": {"type": "string"}, "cc": {"type": "string"}, "reply_to": {"type": "string"},
            "subject": {"type": "string"}, "text": {"type": "string"},
            "html": {"type": "string"},
            "template": {"type": "boolean", "description": "render subject/text/html per "
                         "recipient with sandboxed Jinja2 and the recipient's variables"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
            "metadata": {"type": "object"},
            "not_before": {"type": "number", "description": "Unix time"},
            "max_age": {"type": "number", "description": "seconds"},
            "dsn": {"type": "boolean", "description": "a bounce or expiry sends a delivery "
                    "status notification (RFC 3464) to the envelope sender"}}}
    result = {"type": "object", "required": ["index"], "properties": {
        "index": {"type": "integer"},
        "ids": {"type": "array", "items": {"type": "string"},
                "description": "one message id per recipient"},
        "duplicate": {"type": "boolean"},
        "error": {"type": "object", "properties": {
            "field": {"type": ["string", "null"]}, "message": {"type": "string"},
            "line": {"type": ["integer", "null"]}, "retryable": {"type": "boolean"},
            "reason": {"type": "string", "enum": ["queue_full", "no_quorum", "not_serving",
                                                  "pending_commit", "timeout"],
                       "description": "why a retryable refusal may pass later"},
            "outcome_unknown": {"type": "boolean"}}}}}
    bearer: list[dict[str, list[str]]] = [{"apiKey": []}]
    mid = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "raymta HTTP API", "version": "1"},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Message": message, "Result": result,
                "Error": {"type": "object", "properties": {"error": {
                    "type": "object", "properties": {
                        "status": {"type": "integer"}, "field": {"type": ["string", "null"]},
                        "message": {"type": "string"}}}}}}},
        "paths": {
            "/v1/messages": {"post": {
                "summary": "queue up to 1,000 messages (200 once durable on a quorum)",
                "security": bearer,
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "maxLength": 100}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["messages"], "properties": {
                        "messages": {"type": "array", "minItems": 1, "maxItems": 1000,
                                     "items": {"$ref": "#/components/schemas/Message"}}}}}}},
                "responses": {
                    "200": {"description": "every message accepted or refused for good",
                            "content": {"application/json": {"schema": {
                                "type": "object", "properties": {"results": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Result"}}}}}}},
                    "400": _err("malformed JSON or request (the field is named)"),
                    "401": _err("no or unknown API key"),
                    "403": _err("a from/sender domain the key may not use"),
                    "413": _err("body too large or more than 1,000 messages"),
                    "429": {"description": "the queue is full (every retryable refusal has "
                            "reason queue_full): retry with the same Idempotency-Key after "
                            "Retry-After seconds; results as for 200"},
                    "503": {"description": "some messages were refused retryable for another "
                            "reason (no quorum, not serving, still being committed, timeout): "
                            "retry with the same Idempotency-Key after Retry-After seconds; "
                            "results as for 200"}}}},
            "/v1/messages/{id}": {
                "get": {"summary": "a message's state", "security": bearer,
                        "parameters": [mid],
                        "responses": {"200": {"description": "state"},
                                      "400": _err("not a message id"), "401": _err("no key"),
                                      "404": _err("unknown id")}},
                "delete": {"summary": "cancel a queued message", "security": bearer,
                           "parameters": [mid],
                           "responses": {"200": {"description": "cancelled, cancel pending, "
                                                 "or already final"},
                                         "401": _err("no key"), "404": _err("unknown id")}}},
            "/v1/events": {"get": {
                "summary": "events after a cursor (keys with events = true)",
                "security": bearer,
                "parameters": [{"name": "cursor", "in": "query", "schema": {"type": "string"},
                                "description": "shard:seq,... from the last answer"},
                               {"name": "limit", "in": "query",
                                "schema": {"type": "integer", "maximum": 10000}},
                               {"name": "wait", "in": "query",
                                "schema": {"type": "number", "minimum": 0, "maximum": 30},
                                "description": "long-poll: when no event follows the cursor, "
                                "answer when the first one comes, at most this many seconds"}],
                "responses": {"200": {"description": "events and the next cursor (no events "
                                      "and the same cursor when none came within wait); "
                                      "'skipped', per shard, when events after the cursor "
                                      "left the event files unread (rotated away, or "
                                      "older than the snapshot a leader was rebuilt from): "
                                      "first_seq, last_seq, events (how many; a lower "
                                      "bound unless exact), exact"},
                              "400": _err("bad cursor, limit or wait"),
                              "401": _err("no key"), "403": _err("key may not read events")}}},
            "/healthz": {"get": {"summary": "process up", "responses": {
                "200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "every shard serving with a quorum", "responses": {
                "200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        },
    }
