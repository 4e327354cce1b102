"""Where a batch goes under the output root: OUTPUT_PATH_TEMPLATE and the file names.

Pure functions and small objects, independent of the file system, so an object-store sink
can make its keys the same way: a template renders, for each entry, the relative directory
its file belongs in (posix, "" for the flat layout); a file's name is
`<host>_<shard>-<slot>_<UTC time>_<seq>` plus the compression's suffix.

The template's fields are `{shard}`, `{year}`, `{month}`, `{day}`, `{hour}`, from the
entry's timestamp converted to UTC, zero-padded (year 4 digits, the others 2; the shard
as it is). `2019-10-13T01:30:00+02:00` is 2019-10-12, hour 23. The conversion is integer
arithmetic on the instant (as sharding does), so an offset that moves the instant past
year 9999 or before year 1 still has a directory (`10000`, `0000`).

A template is refused (`InvalidTemplate`, at start-up) for an unknown field, a field with
a format spec or conversion, an absolute path, an empty part, a part `..` or starting with
"." (the consumer's own files and directories start with "."), or a part longer than a
file name may be.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.common.schema import Entry, EntryError, InvalidEntries
from services.common.sharding import unix_seconds

FIELDS = ("shard", "year", "month", "day", "hour")
# Longest part of a template, in bytes of UTF-8: a rendered part is never longer than its
# template ({year} renders 4 digits, {shard} at most 3), and a file name may have 255.
MAX_PART_BYTES = 255
# Rendered directories remembered per shard (one per distinct UTC minute and offset seen);
# past it the cache starts over, which only costs re-rendering.
CACHE_SIZE = 4096


class InvalidTemplate(ValueError):
    """OUTPUT_PATH_TEMPLATE is not a safe relative directory template."""


@dataclass(frozen=True)
class PathTemplate:
    """A checked OUTPUT_PATH_TEMPLATE. `PathTemplate("")` is the flat layout."""

    text: str = ""

    def __post_init__(self) -> None:
        check_template(self.text)

    @property
    def flat(self) -> bool:
        return not self.text

    def render(self, shard: int, year: int, month: int, day: int, hour: int) -> str:
        return self.text.format(
            shard=shard, year=f"{year:04d}", month=f"{month:02d}", day=f"{day:02d}",
            hour=f"{hour:02d}",
        )  # fmt: skip

    def directory(self, timestamp: str, shard: int) -> str:
        """The relative directory of an entry with this timestamp in this shard. Raises
        ValueError if the timestamp names no instant (2019-02-30)."""
        year, month, day, hour = utc_fields(timestamp)
        return self.render(shard, year, month, day, hour)

    def router(self, shard: int) -> Router | None:
        """What the shard's batcher asks for each entry's directory; None when flat."""
        return None if self.flat else Router(self, shard)


class Router:
    """One shard's entries to their directories, cached by what decides them: the
    timestamp up to its minute, and its offset (offsets are whole minutes, so the seconds
    never change the UTC hour). Event loop only (not thread-safe)."""

    def __init__(self, template: PathTemplate, shard: int) -> None:
        self._template = template
        self._shard = shard
        self._cache: dict[str, str] = {}

    def directories(self, entries: list[Entry]) -> list[str]:
        """Each entry's directory. Raises `InvalidEntries` naming every entry whose
        timestamp names no instant (the API refuses those; a hand-published message may
        hold one)."""
        cache = self._cache
        found: list[str] = []
        errors: list[EntryError] = []
        for index, entry in enumerate(entries):
            timestamp = entry["timestamp"]
            key = timestamp[:16] + (timestamp[-6:] if timestamp[-1] not in "Zz" else "Z")
            directory = cache.get(key)
            if directory is None:
                try:
                    directory = self._template.directory(key[:16] + ":00" + key[16:], self._shard)
                except (ValueError, OverflowError) as exc:
                    errors.append(EntryError(f"not a real instant: {exc}", index, "timestamp"))
                    continue
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[key] = directory
            found.append(directory)
        if errors:
            raise InvalidEntries(errors)
        return found


def check_template(text: str) -> None:
    """Raise `InvalidTemplate` unless `text` is a safe relative directory template."""
    if not text:
        return
    if text.startswith("/"):
        raise InvalidTemplate("must be a relative path (it starts with /)")
    if "\0" in text:
        raise InvalidTemplate("must not contain a NUL character")
    _check_fields(text)
    for part in text.split("/"):
        _check_part(part)


def _check_fields(text: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise InvalidTemplate(
            f"is not a valid template ({exc}); a literal brace is written {{{{ or }}}}"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            raise InvalidTemplate(
                f"has an unknown field {{{name}}}; the fields are "
                + ", ".join(f"{{{field}}}" for field in FIELDS)
            )
        if spec or conversion:
            raise InvalidTemplate(f"field {{{name}}} takes no format (it is zero-padded)")


def _check_part(part: str) -> None:
    if not part:
        raise InvalidTemplate("has an empty part (// or a trailing /)")
    if part == "..":
        raise InvalidTemplate("must not climb out of DATA_OUTPUT_DIR (a part is ..)")
    if part.startswith("."):
        raise InvalidTemplate(
            f"has a part starting with '.' ({part!r}): such names are the consumer's own"
        )
    if len(part.encode()) > MAX_PART_BYTES:
        raise InvalidTemplate(f"has a part longer than {MAX_PART_BYTES} bytes")


def utc_fields(timestamp: str) -> tuple[int, int, int, int]:
    """(year, month, day, hour) of an RFC 3339 timestamp's instant in UTC."""
    days, seconds = divmod(unix_seconds(timestamp), 86400)
    year, month, day = civil_from_days(days)
    return year, month, day, seconds // 3600


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The proleptic Gregorian (year, month, day) `days` after 1970-01-01, for any year
    (H. Hinnant's algorithm; datetime stops at years 1 and 9999)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


Clock = Callable[[], datetime]


class FileNames:
    """Batch file names for one host: `<host>_<worker>_<UTC time>_<seq><suffix>`; the
    sequence makes names of one process unique, the host those of replicas."""

    def __init__(self, host: str, suffix: str, clock: Clock = lambda: datetime.now(UTC)) -> None:
        self.host = safe_host(host)
        self.suffix = suffix
        self._clock = clock
        self._seq = itertools.count(1)  # next() is atomic: names are made on several threads

    def stem(self, worker: str) -> str:
        """A new name without its suffix (the rejected-message files use their own)."""
        stamp = self._clock().strftime("%Y%m%dT%H%M%S%fZ")
        return f"{self.host}_{worker}_{stamp}_{next(self._seq):08d}"

    def name(self, worker: str) -> str:
        return self.stem(worker) + self.suffix


def safe_host(name: str) -> str:
    """A host name fit for file names: "_" separates fields, so it becomes "-"."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", name)[:63] or "host"
