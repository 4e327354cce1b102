"""The README's configuration table is the settings' documentation: keep them in step."""

from __future__ import annotations

from pathlib import Path

from services.api.settings import ApiSettings
from services.consumer.settings import ConsumerSettings
from services.operator.settings import OperatorSettings

README = Path(__file__).parents[2] / "README.md"


def test_readme_documents_every_setting() -> None:
    text = README.read_text()
    names = {
        *ApiSettings.model_fields,
        *ConsumerSettings.model_fields,
        *OperatorSettings.model_fields,
    }
    missing = [name.upper() for name in sorted(names) if name.upper() not in text]
    assert not missing, f"README configuration table lacks {missing}"


def test_readme_names_the_test_command_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in README.read_text()
