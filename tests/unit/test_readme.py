"""The README's configuration and metrics tables document the settings and the metrics: keep
them in step."""

from __future__ import annotations

from pathlib import Path

from services.api.metrics import ApiMetrics
from services.api.settings import ApiSettings
from services.common.metrics import new_registry
from services.consumer.freshness import Freshness
from services.consumer.metrics import ConsumerMetrics
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


def test_readme_documents_every_metric() -> None:
    registry = new_registry(process=False)
    ApiMetrics(registry, 1)
    ConsumerMetrics(registry)
    Freshness(registry, 1)
    names = {family.name for family in registry.collect() if family.name.startswith("adp_")}
    # prometheus_client names a counter's family without its `_total`.
    text = README.read_text()
    missing = [n for n in sorted(names) if f"`{n}`" not in text and f"`{n}_total`" not in text]
    assert not missing, f"README's metrics tables lack {missing}"
