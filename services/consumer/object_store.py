"""The object store behind OUTPUT_URL=s3://bucket/prefix: one S3 bucket (or an
S3-compatible store at S3_ENDPOINT_URL), keys under the prefix, through obstore (a Rust
client with both blocking and async calls, small in the image).

Credentials and region come from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, web identity),
read by the client itself; nothing here logs them. Every failure of the store surfaces as
`StoreError` (an OSError: the pool retries it with capped backoff, nothing acked meanwhile,
readiness false), with a one-line message; `BucketMissing` is a start-up error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore.store import ClientConfig

# A request that gets no answer within this is failed (and retried by the pool).
REQUEST_TIMEOUT = "30s"
CONNECT_TIMEOUT = "5s"
# What the client raises: its own errors, and OSError kinds (FileNotFoundError for a 404).
_FAILURES = (BaseError, OSError)
# What S3 answers to credentials it refuses.
DENIED = ("403 Forbidden", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId")


class StoreError(OSError):
    """The store refused or did not answer (unreachable, 5xx, SlowDown, denied)."""


class BucketMissing(RuntimeError):
    """OUTPUT_URL names a bucket the store does not have."""


@dataclass(frozen=True)
class ObjectLocation:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" for the bucket's root

    @classmethod
    def parse(cls, url: str) -> ObjectLocation:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"OUTPUT_URL must look like s3://bucket/prefix, not {url!r}")
        return cls(parts.netloc, parts.path.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def _short(exc: BaseException) -> str:
    """The first line of a client error (its debug dump follows on the next lines)."""
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


class ObjectStore:
    """Keys are relative to the prefix. Blocking calls are for threads, `*_async` for the
    event loop. `on_error(operation)` counts failures, `on_put(seconds)` times PUTs."""

    def __init__(
        self,
        location: ObjectLocation,
        *,
        endpoint: str | None = None,
        on_error: Callable[[str], None] = lambda operation: None,
        on_put: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.location = location
        options: ClientConfig = {"timeout": REQUEST_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
            options["allow_http"] = endpoint.startswith("http://")
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix or None,
            client_options=options,
            # The client's own retries stay short: the pool retries with its capped backoff
            # and shows the failure (counter, warning, readiness).
            retry_config={
                "max_retries": 2,
                "retry_timeout": timedelta(seconds=10),
                "backoff": {"init_backoff": timedelta(milliseconds=50),
                            "max_backoff": timedelta(seconds=1), "base": 2},
            },
            **config,
        )  # fmt: skip
        self._on_error = on_error
        self._on_put = on_put

    # --- blocking (threads) ------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        started = time.perf_counter()
        try:
            obstore.put(self._store, key, data, use_multipart=False)
        except _FAILURES as exc:
            raise self._error("put", key, exc) from None
        self._on_put(time.perf_counter() - started)

    def get(self, key: str) -> bytes | None:
        """The object's bytes, None if there is none."""
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except FileNotFoundError:
            return None
        except _FAILURES as exc:
            raise self._error("get", key, exc) from None

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        except _FAILURES as exc:
            raise self._error("head", key, exc) from None
        return True

    def keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last-modified as Unix time) of every object under `prefix`."""
        try:
            for chunk in obstore.list(self._store, prefix=prefix):
                for meta in chunk:
                    yield meta["path"], meta["last_modified"].timestamp()
        except _FAILURES as exc:
            raise self._error("list", prefix, exc) from None

    def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            obstore.delete(self._store, keys)
        except FileNotFoundError:
            return
        except _FAILURES as exc:
            raise self._error("delete", keys[0], exc) from None

    def check_bucket(self) -> None:
        """Start-up: raise `BucketMissing` if the bucket does not exist, StoreError if the
        store cannot be listed now (unreachable, credentials refused)."""
        try:
            for _ in obstore.list(self._store, prefix=".ledger", chunk_size=1):
                break
        except _FAILURES as exc:
            if "NoSuchBucket" in str(exc):
                raise BucketMissing(
                    f"the bucket {self.location.bucket!r} of OUTPUT_URL={self.location} does "
                    "not exist: create it (the consumer does not)"
                ) from None
            raise self._error("list", "", exc) from None

    # --- async (event loop) ------------------------------------------------------------------

    async def put_async(self, key: str, data: bytes) -> None:
        started = time.perf_counter()
        try:
            await obstore.put_async(self._store, key, data, use_multipart=False)
        except _FAILURES as exc:
            raise self._error("put", key, exc) from None
        self._on_put(time.perf_counter() - started)

    async def delete_async(self, key: str) -> None:
        try:
            await obstore.delete_async(self._store, key)
        except FileNotFoundError:
            return
        except _FAILURES as exc:
            raise self._error("delete", key, exc) from None

    def _error(self, operation: str, key: str, exc: BaseException) -> StoreError:
        self._on_error(operation)
        hint = ""
        text = str(exc)
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or any(
            code in text for code in DENIED
        ):
            hint = " (credentials refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        return StoreError(
            f"object store {operation} {key!r} in {self.location}{hint}: {_short(exc)}"
        )
