"""The entry schema: what a client may send and what travels through the broker.

An entry is `{"timestamp": RFC 3339 date-time with a UTC offset, "value": string or null}`.
The timestamp string is kept exactly as the client sent it (so the batch files hold the
client's own text); its instant is computed only where it is needed (sharding).

Validation runs once, in pydantic-core, straight from the request bytes; errors come back as
`EntryError`s naming the offending index and field, so the edge can answer with them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from pydantic_core import to_json
from typing_extensions import TypedDict

# RFC 3339 `date-time` (section 5.6), with the offset required. "T" and "Z" may be lower
# case (the RFC allows it). [0-9] rather than \d: \d would match non-ASCII digits. Up to
# nine fraction digits (nanoseconds) are accepted and kept verbatim; sharding truncates
# them. Range checks (month 13, Feb 30, second 60, offset 24:00) happen in `sharding`.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)

Timestamp = Annotated[
    str,
    Field(
        pattern=RFC3339_PATTERN,
        description="RFC 3339 date-time with a UTC offset, e.g. 2019-10-12T07:20:50.52Z.",
        examples=["2019-10-12T07:20:50.52Z", "2019-10-12T09:20:50+02:00"],
    ),
]

# Most errors listed in one 400 answer: a hostile body of 100k bad entries must not make
# a 10 MB error document.
MAX_REPORTED_ERRORS = 20


# A TypedDict, not a model: validated entries are plain dicts of strings, which the garbage
# collector does not track and which serialize in one call. (As models, the entries of
# requests waiting for their confirm made the collector the API's largest cost.)
@with_config(ConfigDict(extra="forbid", strict=True, title="Entry"))
class Entry(TypedDict):
    """One data point. Unknown fields are rejected, so a typo (`"valeu"`) cannot silently
    drop data."""

    timestamp: Timestamp
    value: NotRequired[
        Annotated[
            str | None,
            Field(
                default=None,
                description="Any string, any length (bounded by the body size); optional.",
            ),
        ]
    ]


ENTRIES = TypeAdapter(list[Entry])
ENTRY = TypeAdapter(Entry)


@dataclass(frozen=True, slots=True)
class EntryError:
    """One reason a body was refused. `index` is the entry's position in the array (None for
    the body as a whole), `field` the entry's field (None for the entry as a whole)."""

    message: str
    index: int | None = None
    field: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def __str__(self) -> str:
        where = [] if self.index is None else [f"entry {self.index}"]
        if self.field is not None:
            where.append(self.field)
        return ": ".join([*where, self.message])


class InvalidEntries(ValueError):
    """The body is not a non-empty JSON array of valid entries."""

    def __init__(self, errors: list[EntryError], total: int | None = None) -> None:
        self.errors = errors[:MAX_REPORTED_ERRORS]
        self.total = len(errors) if total is None else total
        super().__init__(str(self.errors[0]) if self.errors else "invalid entries")


def parse_entries(body: bytes) -> list[Entry]:
    """Validate a request body: a non-empty JSON array of entries.

    Raises `InvalidEntries`. Timestamps are checked for shape here and for being a real
    instant when they are sharded (`sharding.group_by_shard`).
    """
    try:
        entries = ENTRIES.validate_json(body)
    except ValidationError as exc:
        raise _translate(exc, body) from None
    if not entries:
        raise InvalidEntries([EntryError("the array is empty: send at least one entry")])
    return entries


def parse_message(body: bytes) -> list[Entry]:
    """Validate a message body from the broker: an array of entries (what this API
    publishes) or a single entry object (what the Go original published)."""
    stripped = body.lstrip()
    if stripped[:1] == b"{":
        try:
            return [ENTRY.validate_json(body)]
        except ValidationError as exc:
            raise _translate(exc, body, single=True) from None
    return parse_entries(body)


def _translate(exc: ValidationError, body: bytes, *, single: bool = False) -> InvalidEntries:
    """pydantic's errors in the contract's words: index, field, message."""
    found: list[EntryError] = []
    for error in exc.errors(include_url=False, include_input=False):
        kind = error["type"]
        loc = error["loc"]
        if kind == "json_invalid":
            return InvalidEntries([EntryError(_json_problem(body, error["msg"]))])
        if single:
            loc = (0, *loc)
        if not loc:
            found.append(EntryError("the body must be a JSON array of entries"))
            continue
        index = loc[0] if isinstance(loc[0], int) else None
        field = ".".join(str(part) for part in loc[1:]) or None
        found.append(EntryError(_message(kind, error["msg"], field), index, field))
    return InvalidEntries(found, total=exc.error_count())


def _message(kind: str, msg: str, field: str | None) -> str:
    if kind == "string_pattern_mismatch" and field == "timestamp":
        return (
            "must be an RFC 3339 date-time with a UTC offset, "
            "e.g. 2019-10-12T07:20:50.52Z or 2019-10-12T09:20:50+02:00"
        )
    if kind == "string_type" and field == "timestamp":
        return "must be a string holding an RFC 3339 date-time with a UTC offset"
    if kind in ("dict_type", "model_type"):
        return "must be a JSON object with a timestamp and an optional value"
    if kind == "extra_forbidden":
        return "unknown field (an entry has only timestamp and value)"
    return msg


def _json_problem(body: bytes, msg: str) -> str:
    """Error path only: tell apart bytes that are not UTF-8 from malformed JSON."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the body is not valid UTF-8 (byte {exc.start})"
    if not body.strip():
        return "the body is empty: send a JSON array of entries"
    return f"the body is not valid JSON: {msg.removeprefix('Invalid JSON: ')}"


def dump_entries(entries: list[Entry]) -> bytes:
    """Entries as a compact JSON array: the echo, the wire format and the file lines."""
    return to_json(entries)


def entries_json_schema() -> dict[str, Any]:
    """JSON Schema of a request body, for the OpenAPI document."""
    schema = ENTRIES.json_schema()
    schema["minItems"] = 1
    return schema
