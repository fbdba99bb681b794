"""pytest plugin: a `metastore_cluster` fixture factory.

Enable it in a conftest.py with `pytest_plugins = ["metastore.testing_plugin"]`:

    def test_my_app(metastore_cluster):
        cluster = metastore_cluster(3)          # started, leader elected
        run_my_app(cluster.client_urls)

Every cluster a test starts is stopped when the test ends; when the test
failed, the members' logs are attached to the report.
"""
from __future__ import annotations

from typing import Callable, Iterator

import pytest

from metastore.testing import LocalCluster


@pytest.fixture
def metastore_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalCluster]]:
    started: list[LocalCluster] = []

    def start(size: int = 3, **kwargs: object) -> LocalCluster:
        cluster = LocalCluster(size, **kwargs)  # type: ignore[arg-type]
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    failed = getattr(request.node, "rep_call", None)
    for cluster in started:
        if failed is not None and failed.failed:
            request.node.add_report_section("call", "metastore logs", cluster.logs()[-20000:])
        cluster.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
