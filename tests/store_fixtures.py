"""Store fixtures parametrized over every engine in store_engines.ENGINES.

Import the fixtures a test module uses from here (pytest picks up fixtures
found in the module's namespace); tests/conftest.py belongs to the lead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from metastore.mvcc import MVCCStore
from store_engines import ENGINES, FACTORIES, Engine


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    return FACTORIES[request.param]


@pytest.fixture
def make_store(engine: Engine, tmp_path: Path) -> Iterator[Callable[[], tuple[MVCCStore, Path]]]:
    """Opens as many independent stores of the engine as a test needs."""
    opened: list[MVCCStore] = []

    def make() -> tuple[MVCCStore, Path]:
        path = tmp_path / f"store{len(opened)}"
        path.mkdir()
        store = engine.open(path)
        opened.append(store)
        return store, path

    yield make
    for store in opened:
        try:
            store.close()
        except Exception:
            pass


@pytest.fixture
def store(make_store: Callable[[], tuple[MVCCStore, Path]]) -> MVCCStore:
    return make_store()[0]


@pytest.fixture
def reopen(engine: Engine) -> Iterator[Callable[[MVCCStore, Path], MVCCStore]]:
    """Restarts a store on its data; the reopened stores are closed at the end."""
    reopened: list[MVCCStore] = []

    def do(store: MVCCStore, path: Path) -> MVCCStore:
        again = engine.reopen(store, path)
        reopened.append(again)
        return again

    yield do
    for store in reopened:
        try:
            store.close()
        except Exception:
            pass
