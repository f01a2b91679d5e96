"""Shared fixtures: provisioned and loaded models, in-process clusters (one per model, per session)."""

from __future__ import annotations

import pytest

from pdserve.model import LoadedModel, load_model
from pdserve.model.provision import fetch_default_model
from tests.cluster import InProcessCluster, start_cluster

_loaded: dict[str, LoadedModel] = {}


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model's folder; provisions it offline on first use (about 30 s)."""
    return fetch_default_model()


def get_loaded(spec: str) -> LoadedModel:
    if spec not in _loaded:
        _loaded[spec] = load_model(spec)
    return _loaded[spec]


@pytest.fixture(scope="session")
def smol(default_model_dir) -> LoadedModel:
    return get_loaded("default")


@pytest.fixture(scope="session")
async def smol_cluster(smol) -> InProcessCluster:
    cluster = await start_cluster(smol)
    yield cluster
    await cluster.stop()


@pytest.fixture(scope="session")
async def tiny_cluster() -> InProcessCluster:
    cluster = await start_cluster(get_loaded("preset:tiny-llama"))
    yield cluster
    await cluster.stop()


def pytest_terminal_summary(terminalreporter):
    """The fault-injection suite's one line: its runs' summaries added up (tests/test_faults.py)."""
    from tests import test_faults

    runs = test_faults.SUMMARIES
    if not runs:
        return
    total = {key: sum(r[key] for r in runs) for key in ("faults", "requests", "completed", "token-exact", "lost",
                                                         "duplicated")}
    terminalreporter.write_sep("-", "fault injection")
    terminalreporter.write_line(
        f"faults: {total['faults']} injected, requests: {total['requests']}, completed: {total['completed']}, "
        f"token-exact: {total['token-exact']}, lost: {total['lost']}, duplicated: {total['duplicated']}")
    for error in sorted({e for r in runs for e in r["errors"]}):
        terminalreporter.write_line(f"  lost to: {error}")
