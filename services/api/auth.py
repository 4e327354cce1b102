"""Optional bearer-token authentication of POST /message.

Off unless tokens are configured (API_TOKENS, or API_TOKENS_FILE: a file with one token a
line, e.g. a mounted Kubernetes Secret; read once at start-up, so a rotation restarts the
pods — the chart's checksum annotation does it). A request's token is compared, in constant
time, with every configured token, so neither a match's position nor a prefix leaks through
timing. Tokens are never logged. Probes and /metrics stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from services.api.settings import ApiSettings

_BEARER = b"bearer "


class TokenCheck:
    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> TokenCheck | None:
        tokens = settings.api_token_list()
        return cls(tokens) if tokens else None

    def allows(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        given = b""
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == _BEARER:
                given = value[7:].strip()
                break
        matched = False
        for token in self._tokens:  # every one, whatever matched: constant time
            matched |= hmac.compare_digest(given, token)
        return matched and bool(given)
