"""Shared test fixtures: the repository root on sys.path and the real-data folder."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "stanford_cars"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/stanford_cars (real 128x96 Stanford Cars photos); skips the test when absent."""
    if not (SHARED_DATA / "devkit" / "cars_meta.mat").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (pytestmark = pytest.mark.usefixtures("one_thread")):
    tests that check results, not speed, and on a busy shared machine OpenMP threads waiting on each
    other make a tiny forward pass take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (3 classes, 36 training images) for the training tests."""
    import data
    root = tmp_path_factory.mktemp("tiny")
    return Path(data.make_demo_dataset(root / "demo", num_classes=3, train_per_class=12, test_per_class=4, seed=0))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
