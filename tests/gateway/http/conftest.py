"""The HTTP front over the real suite (its own: the tests add categories), with the shop catalogue."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from common.config import load_config
from gateway.client import VisualSearchClient
from gateway.http.config import HttpConfig
from gateway.http.server import RunningFront, start
from tests.helpers import Suite, shop_catalogue, start_suite


@dataclass
class Front:
    suite: Suite
    running: RunningFront

    @property
    def url(self) -> str:
        return self.running.url


def start_front(gateway_address: str, **overrides) -> RunningFront:
    return start(
        load_config(
            HttpConfig, "http", environ={}, port=0, gateway_address=gateway_address, log_format="text", **overrides
        )
    )


@pytest.fixture(scope="package")
def front() -> Iterator[Front]:
    """The suite with the shop catalogue ("coffee-cup" in tableware, "moto-left" in vehicles, and
    distractors), and an HTTP front over its gateway."""
    suite = start_suite()
    try:
        with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
            client.index_products(shop_catalogue())
        running = start_front(suite.addresses["gateway"])
        try:
            yield Front(suite, running)
        finally:
            running.stop()
    finally:
        suite.stop()
