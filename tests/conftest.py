"""Shared fixtures. The real data lives in ``../shared/data`` beside the project root; tests fail
(not skip) when it is missing, since CI always has it."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real data missing: {SHARED_DATA} (see ../shared/data/README.md)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def devkit(shared_data) -> Path:
    return shared_data / "ilsvrc2014_devkit"


@pytest.fixture(scope="session")
def chess(shared_data) -> Path:
    return shared_data / "chess"


def pytest_configure(config):
    # One torch thread: the suite runs on small CI machines (2 cores) where OpenMP threads that wait on
    # each other make small models many times slower than a single thread. The environment says so too,
    # for the tools that tests run (in this process or as subprocesses: detector.base.threads reads it).
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
