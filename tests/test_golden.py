"""Short pre-training, DiT and T2I runs give the losses and tensors recorded in tests/golden/<CPU kind>/.

Bit for bit where this host's CPU kind has a recording; within a tight tolerance (`record.RTOL`) against another kind's
recording otherwise, with a warning that says how to record this kind (`python tests/golden/record.py`)."""
import copy, json, sys, warnings
from pathlib import Path
import pytest
from vtp_nbdev.config import cpu_kind

sys.path.insert(0, str(Path(__file__).resolve().parent/'golden'))
from record import golden_runs, recorded_kinds, differences, RTOL

NAMES = ['pretrain', 'dit', 't2i']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    return golden_runs(tmp_path_factory.mktemp('golden'))


def reference(name: str, kind: str) -> tuple:
    "(kind, recording, exact): this kind's recording, else another kind's that carries tensor sums."
    kinds = recorded_kinds(name)
    assert kinds, f"tests/golden/*/{name}.json: no recorded golden values"
    if kind in kinds:
        return kind, kinds[kind], True
    with_sums = sorted(k for k, v in kinds.items() if 'sums' in v)
    assert with_sums, f"{name}: no recording for CPU kind {kind} and none with tensor sums among {sorted(kinds)}"
    same_vendor = [k for k in with_sums if k.split('-')[0] == kind.split('-')[0]]
    other = (same_vendor or with_sums)[0]
    return other, kinds[other], False


@pytest.mark.parametrize('name', NAMES)
def test_matches_recorded(runs, name):
    kind = cpu_kind()
    ref_kind, want, exact = reference(name, kind)
    if not exact:
        warnings.warn(f"golden {name}: no recording for this CPU kind ({kind}); compared with {ref_kind}'s within "
                      f"rtol {RTOL}. Record this kind with `python tests/golden/record.py`.")
    bad = differences(runs[name], want, exact)
    how = 'bit for bit' if exact else f'within rtol {RTOL}'
    assert not bad, f"{name} on {kind}, compared {how} with {ref_kind}'s recording:\n" + '\n'.join(bad[:10])


def test_every_recording_has_the_three_runs():
    kinds = {k for n in NAMES for k in recorded_kinds(n)}
    assert kinds, "tests/golden/: no CPU kind recorded"
    for k in kinds:
        missing = [n for n in NAMES if k not in recorded_kinds(n)]
        assert not missing, f"tests/golden/{k}/: {missing} missing (re-record with `python tests/golden/record.py`)"


def test_comparison_catches_changes():
    "The comparison itself: exact catches a last-bit change, the tolerance passes it and catches a real one."
    kinds = {k: v for k, v in recorded_kinds('dit').items() if 'sums' in v}
    assert kinds, "no recording with tensor sums to test the comparison on"
    want = next(iter(kinds.values()))
    assert differences(copy.deepcopy(want), want, exact=True) == []
    tiny, real = copy.deepcopy(want), copy.deepcopy(want)
    tiny['rows'][0]['loss'] *= 1 + 1e-7
    real['rows'][0]['loss'] *= 1 + 1e-2
    assert differences(tiny, want, exact=True) and not differences(tiny, want, exact=False)
    assert differences(real, want, exact=False)
    f, sums = next((f, s) for f, s in want['sums'].items() if s)
    k = next(iter(sums))
    moved = copy.deepcopy(want)
    moved['sums'][f][k][2] *= 1.1
    moved['files'][f][k] = '0' * 64
    assert differences(moved, want, exact=False) and differences(moved, want, exact=True)
