import os, sys
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent/'shared'/'fixtures'


@pytest.fixture
def fixtures_dir():
    "The official-implementation fixtures (shared/ beside the repository); skip when absent."
    if not FIXTURES.is_dir(): pytest.skip(f"official fixtures not found at {FIXTURES}")
    return FIXTURES
