"""Shared fixtures: small synthetic models written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models import make_test_models


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'tiny-q40': path, 'tiny-f32': ..., 'qwen3-tiny-q40': ..., 'qwen3-tiny-f32': ...}"""
    folder = os.environ.get("MPILLAMA_TEST_MODELS")
    return make_test_models(Path(folder) if folder else tmp_path_factory.mktemp("models"))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/mpi runs only under mpirun (with --with-mpi), launched by tests/test_mpi_runs.py."""
    if "mpi" in collection_path.parts and collection_path.name != "mpi_launch.py" and not config.getoption("with_mpi"):
        return True
    return None
