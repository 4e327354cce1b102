"""The dependency audit's rules, on made-up PyPI answers (the real run is part of
`make test`)."""

from __future__ import annotations

from typing import Any

import pytest

from scripts.audit_deps import audit, runtime_closure


def answer(latest: str, *vulnerabilities: dict[str, Any]) -> dict[str, Any]:
    return {"info": {"version": latest}, "vulnerabilities": list(vulnerabilities)}


def test_a_known_vulnerability_of_an_installed_latest_release_is_reported() -> None:
    answers = {
        "clean": answer("1.0"),
        "bad": answer("2.0", {"id": "GHSA-x", "fixed_in": []}),
        "old": answer("3.1", {"id": "PYSEC-y", "fixed_in": ["3.1"]}),
        "withdrawn": answer("1.0", {"id": "GHSA-z", "fixed_in": [], "withdrawn": "2026"}),
    }
    report = audit(
        {"clean": "1.0", "bad": "2.0", "old": "3.0", "withdrawn": "1.0"}, answers.__getitem__
    )
    assert report.vulnerable == {"bad": ["GHSA-x (fixed in no release)"]}
    assert report.behind == {"old": ("3.0", "3.1")}  # not auditable from this data
    assert set(report.audited) == {"clean", "bad", "withdrawn"}


def test_pypi_unreachable_is_an_error_not_a_pass() -> None:
    def down(name: str) -> dict[str, Any]:
        raise OSError("unreachable")

    with pytest.raises(OSError, match="unreachable"):
        audit({"a": "1"}, down)


def test_the_closure_follows_requirements_and_extras() -> None:
    plain = runtime_closure("async-data-processor", [])
    with_operator = runtime_closure("async-data-processor", ["operator"])
    assert {"starlette", "uvicorn", "aio-pika", "pydantic", "httptools"} <= set(plain)
    assert "kopf" not in plain
    assert "kopf" in with_operator
    assert "pytest" not in with_operator  # test tools are not shipped
