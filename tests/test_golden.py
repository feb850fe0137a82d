"Short pre-training, DiT and T2I runs give bit-identical losses and tensors to the values recorded in tests/golden/."
import json, sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent/'golden'))
from record import golden_runs, HERE


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    return golden_runs(tmp_path_factory.mktemp('golden'))


@pytest.mark.parametrize('name', ['pretrain', 'dit', 't2i'])
def test_bit_identical_to_recorded(runs, name):
    path = HERE/f'{name}.json'
    assert path.is_file(), f"{path}: the recorded golden values are missing"
    want, got = json.loads(path.read_text()), runs[name]
    assert got['rows'] == want['rows'], f"{name}: logged losses differ"
    assert sorted(got['files']) == sorted(want['files']), f"{name}: checkpoint files differ"
    for f, hashes in want['files'].items():
        assert got['files'][f].keys() == hashes.keys(), f"{name}/{f}: tensor names differ"
        bad = [k for k in hashes if got['files'][f][k] != hashes[k]]
        assert not bad, f"{name}/{f}: tensors differ: {bad[:5]}"
