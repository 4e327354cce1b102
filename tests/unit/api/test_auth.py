from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.api.auth import TokenCheck
from services.api.settings import ApiSettings

CHECK = TokenCheck(["first-token", "second-token"])


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([], False),
        ([(b"authorization", b"Bearer first-token")], True),
        ([(b"authorization", b"bearer second-token")], True),  # the scheme is case-insensitive
        ([(b"authorization", b"Bearer  second-token ")], True),
        ([(b"authorization", b"Bearer first-toke")], False),  # a prefix is not enough
        ([(b"authorization", b"Bearer first-token-and-more")], False),
        ([(b"authorization", b"Basic Zmlyc3QtdG9rZW4=")], False),
        ([(b"authorization", b"first-token")], False),
        ([(b"authorization", b"Bearer ")], False),
        ([(b"x-token", b"first-token")], False),
    ],
)
def test_only_a_configured_bearer_token_passes(
    headers: list[tuple[bytes, bytes]], allowed: bool
) -> None:
    assert CHECK.allows(headers) is allowed


def test_tokens_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "tokens"
    secret.write_text("# rotated 2026-11\nfrom-file\n\n")
    settings = ApiSettings(api_tokens="a, b ,", api_tokens_file=secret)
    assert settings.api_token_list() == ["a", "b", "from-file"]
    assert "from-file" not in repr(settings)
    assert "a, b" not in repr(settings)  # SecretStr: never printed, never logged


def test_no_tokens_no_check() -> None:
    assert TokenCheck.from_settings(ApiSettings()) is None


def test_a_tokens_file_without_tokens_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValidationError, match="holds no token"):
        ApiSettings(api_tokens_file=empty)
    with pytest.raises(ValidationError, match="holds no token"):
        ApiSettings(api_tokens_file=tmp_path / "missing")
