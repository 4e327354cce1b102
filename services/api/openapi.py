"""The OpenAPI document, built once from the real schemas."""

from __future__ import annotations

from typing import Any, get_args

from services.api.errors import PublishFailure
from services.common.schema import entries_json_schema
from services.common.wire import IDEMPOTENCY_KEY_MAX_LENGTH

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, in one sentence."},
        "errors": {
            "type": "array",
            "description": "For 400: each invalid entry (at most 20), by index and field.",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                },
                "required": ["message"],
            },
        },
        "error_count": {"type": "integer", "description": "For 400: all errors found."},
        "limit_bytes": {"type": "integer", "description": "For 413: MAX_BODY_BYTES."},
        "reason": {
            "type": "string",
            "enum": [*sorted(get_args(PublishFailure)), "overloaded"],
            "description": "For 503: why the broker did not take the entries.",
        },
    },
}

# The 201 echo: every entry with both fields (`value` null when it was absent).
_ECHO = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["timestamp", "value"],
        "properties": {
            "timestamp": {"type": "string", "description": "As sent."},
            "value": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "additionalProperties": False,
    },
}


# The same bounds as services/api/ingest.py checks (a key outside them gets 400).
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Optional: a key the client chooses for this request and sends again, unchanged, "
        "with every retry of it. A retry with the same key and the same body is written "
        "once by the consumer, if it comes within LEDGER_RETENTION_SECONDS of the first "
        "(and the consumer runs with EXACTLY_ONCE); a later retry, or another body under "
        "the same key, is written again, never dropped. Without the header a retry after "
        "a lost answer is written twice."
    ),
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": IDEMPOTENCY_KEY_MAX_LENGTH,
        "pattern": r"^[\x21-\x7e]+$",
    },
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}
        }
    return response


def _probe(description: str) -> dict[str, Any]:
    return {"get": {"summary": description, "responses": {"200": {"description": "OK"}}}}


def openapi_document(version: str) -> dict[str, Any]:
    entries = entries_json_schema()
    defs = entries.pop("$defs", {})
    entries["items"] = {"$ref": "#/components/schemas/Entry"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "async-data-processor ingestion API", "version": version},
        "paths": {
            "/message": {
                "post": {
                    "summary": "Accept entries; 201 once the broker confirmed all of them.",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": entries}},
                    },
                    "responses": {
                        "201": {
                            "description": "Every entry is durable in its shard queue; echoed.",
                            "content": {"application/json": {"schema": _ECHO}},
                        },
                        "400": _error(
                            "Not a non-empty JSON array of valid entries, or an invalid "
                            "Idempotency-Key."
                        ),
                        "401": _error("Tokens are configured and no valid bearer token was sent."),
                        "408": _error("The body did not arrive within BODY_TIMEOUT_SECONDS."),
                        "413": _error("The body is larger than MAX_BODY_BYTES."),
                        "503": _error(
                            "The broker cannot take it now, or too many requests are in "
                            "flight; retry.",
                            retry_after=True,
                        ),
                    },
                }
            },
            "/health": _probe("Alive (kept from the original)."),
            "/healthz": _probe("Alive."),
            "/readyz": {
                "get": {
                    "summary": "Ready: the broker is connected.",
                    "responses": {
                        "200": {"description": "Ready."},
                        "503": {"description": "Not ready; the body says why."},
                    },
                }
            },
            "/metrics": _probe("Prometheus metrics, text format."),
        },
        "components": {"schemas": {**defs, "Error": _ERROR}},
    }
