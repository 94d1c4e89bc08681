"""Shared test fixtures: the repository root on sys.path and the real-data folder."""
import sys
from pathlib import Path

import pytest

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
