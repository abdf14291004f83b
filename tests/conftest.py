"""Shared fixtures. One local Ray cluster per test session (start-up costs ~20 s on 2 cores)."""

from __future__ import annotations

import os

import pytest

from workflows.runtime import tools_of_this_interpreter_first

# Ray Train's worker group can take longer than its default timeout to start on a busy 2-core machine.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default: each run's end (and each failure) waited up to that
# long to be seen, ~3 s a run here. Every run of the suite is short, so poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Never let a test reach for a GPU or the network for weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every process of the session finds the venv's tools first, as an activated venv, the test clusters' nodes and the
# training workers (prepare_worker_process) do: one `ninja` for any JIT op DeepSpeed builds (the processes the tests
# spawn inherit this PATH).
tools_of_this_interpreter_first()


def pytest_collection_modifyitems(config, items):
    """`extended` tests run only under `make extended-test` (DIST_EXTENDED=1): the suite must fit CI's ~25 minutes."""
    if os.environ.get("DIST_EXTENDED"):
        return
    skip = pytest.mark.skip(reason="an extended end-to-end check, left out of `make test` for time: make extended-test")
    for item in items:
        if item.get_closest_marker("extended"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the whole session (4 logical CPUs on 2 cores: decoders + workers)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=1_500_000_000,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}},
    )
    yield ray
    ray.shutdown()
