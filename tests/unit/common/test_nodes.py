"""RABBITMQ_URL as a node list: strict parsing, masked passwords, the order of tries."""

from __future__ import annotations

import pytest
from yarl import URL

from services.common.nodes import Nodes, parse_nodes
from services.common.settings import ServiceSettings

CLUSTER = "amqp://u:pw1@rmq-0:5672/vh,amqp://u:pw2@rmq-1:5672/vh, amqp://u:pw3@rmq-2:5672/vh"


def test_one_url_stays_valid() -> None:
    assert parse_nodes("amqp://guest:guest@localhost:5672/") == (
        URL("amqp://guest:guest@localhost:5672/"),
    )


def test_a_cluster_s_nodes_comma_separated() -> None:
    assert [url.host for url in parse_nodes(CLUSTER)] == ["rmq-0", "rmq-1", "rmq-2"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amqp://a:5672/,", "element 2 of 2 is empty"),
        (",amqp://a:5672/", "element 1 of 2 is empty"),
        ("amqp://a:5672/,http://b/", r"element 2 of 2 \(http://b/\) must be an amqp"),
        ("amqp://a:5672/,amqp://", "element 2 of 2"),
        ("amqp://a:5672/,amqp://b:99999/", "element 2 of 2"),
        ("amqp://a:5672/,amqp://b:x/", "element 2 of 2"),
        ("amqp://a:5672/,amqp://a:5672/", "names a node listed before it"),
        ("amqp://a:5672/one,amqp://b:5672/two", "different virtual hosts"),
        ("", "the URL is empty"),
    ],
)
def test_a_malformed_element_is_named(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_nodes(value)


def test_the_error_never_shows_a_password() -> None:
    with pytest.raises(ValueError, match="element 2") as caught:
        parse_nodes("amqp://u:s3cret@a:5672/,ftp://u:s3cret@b/")
    assert "s3cret" not in str(caught.value)
    assert "u:***@b" in str(caught.value)


def test_every_password_is_masked_in_the_shown_list() -> None:
    shown = ServiceSettings(rabbitmq_url=CLUSTER).rabbitmq_url_redacted
    assert shown == (
        "amqp://u:***@rmq-0:5672/vh,amqp://u:***@rmq-1:5672/vh,amqp://u:***@rmq-2:5672/vh"
    )


def test_round_robin_from_the_start_offset() -> None:
    nodes = Nodes.parse(CLUSTER, start=1)
    assert nodes.current.host == "rmq-1"
    assert [nodes.advance().host for _ in range(3)] == ["rmq-2", "rmq-0", "rmq-1"]
    assert nodes.shown == "amqp://u:***@rmq-1:5672/vh"


def test_processes_start_on_different_nodes() -> None:
    starts = {Nodes.parse(CLUSTER).index for _ in range(200)}
    assert starts == {0, 1, 2}


def test_a_node_is_found_by_host_and_port() -> None:
    nodes = Nodes.parse(CLUSTER, start=0)
    assert nodes.find(URL("amqp://other:pw@rmq-2:5672/vh?heartbeat=5")) == 2
    assert nodes.find(URL("amqp://rmq-2:5673/")) is None
