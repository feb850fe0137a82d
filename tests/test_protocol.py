"The registered v3 protocol: its rules decide synthetic stores with and without the paper's effect as they should."
import math
import pytest
from vtp_nbdev.stats import decide_family
from vtp_nbdev.protocol import (V3_PROTOCOL, synthetic_protocol_store, protocol_family, protocol_settings, claim_names,
                                protocol_units, protocol_store, one_sided_power, protocol_cost, shape_unshown)


def words(store, n_boot=200):
    return [v.word for v in decide_family(protocol_family(store, 'cpu', n_boot=n_boot))]


def test_effect_reproduces_every_claim():
    assert words(synthetic_protocol_store(True)) == ['REPRODUCED'] * 10


def test_no_effect_reproduces_no_vtp_claim():
    w = words(synthetic_protocol_store(False))
    names = claim_names()
    vtp_claims = [i for i, c in enumerate(names) if 'does not improve' not in c]
    assert all(w[i] != 'REPRODUCED' for i in vtp_claims), list(zip(names, w))


@pytest.mark.parametrize('effect', [False, True])
def test_false_positives_stay_near_alpha(effect):
    "Over null stores (both arms flat) the familywise rate of a wrongly REPRODUCED VTP claim stays near alpha."
    hits = 0
    n = 40
    for k in range(n):
        st = synthetic_protocol_store(False, seed=100 + k, noise=0.5)
        if effect:                                   # AE improving as fast as VTP: 'scales better' must not hold
            for y, slope in (('gFD', -6.), ('shape_unshown', -0.15)):
                lx = (st['points'].budget / 2).map(math.log10)
                st['points'][y] = st['points'][y] + slope * lx
        w = decide_family(protocol_family(st, 'cpu', n_boot=100))
        hits += any(v.word == 'REPRODUCED' and 'better' in v.claim for v in w)
    assert hits <= 4, f'{hits} of {n} null stores reproduced a "scales better" claim'


def test_failed_regime_only_touches_gfd_claims():
    st = synthetic_protocol_store(True)
    st['points']['rFD'] = st['points'].gFD / 1.5
    assert words(st) == ['INCONCLUSIVE'] * 5 + ['REPRODUCED'] * 5


def test_missing_seed_or_low_probe_makes_all_inconclusive():
    assert set(words(synthetic_protocol_store(True, seeds=(10, 11, 12, 13)))) == {'INCONCLUSIVE'}
    st = synthetic_protocol_store(True)
    st['random']['probe_shape_grid'] = 0.70          # VTP's grid probe only 5 points above random init
    assert set(words(st)) == {'INCONCLUSIVE'}


def test_registered_settings_are_fresh_and_wide():
    s = protocol_settings('cpu')
    assert not set(s['seeds']) & {0, 1, 2} and len(s['seeds']) >= 5
    assert len(s['budgets']) >= 4 and max(s['budgets']) / min(s['budgets']) >= 16
    assert len(protocol_units('cpu')) == 5 * (1 + 2 * 6)
    assert len(claim_names()) == 5 * len(V3_PROTOCOL['endpoints'])


def test_power_and_cost_helpers():
    assert one_sided_power(1.0, 0.51, 5) > one_sided_power(0.5, 0.51, 5) > 0.05
    assert one_sided_power(1.0, 0.51, 5, alpha=0.005) < one_sided_power(1.0, 0.51, 5)
    assert one_sided_power(0., 1., 5) == pytest.approx(0.05, abs=2e-3)     # no effect: power = alpha
    assert one_sided_power(-1., 1., 5) < 0.01
    c = protocol_cost('cpu', dict(tokenizer_flops_per_s=40e9, point_s=150., stage2_s=100., random_s=20.))
    assert c.part.iloc[-1] == 'total' and 3 < c.hours.iloc[-1] < 30
    assert math.isnan(shape_unshown(0.5, 0.2, 0.15))


def test_store_reads_only_registered_seeds(tmp_path):
    import json
    d = tmp_path/'results'/'cpu'/'v3'
    d.mkdir(parents=True)
    for seed in (1, 10):
        (d/f'AE_tiny_s{seed}_2C_x.json').write_text(json.dumps(dict(protocol='v3', seed=seed, method='AE', budget=2.)))
    st = protocol_store('cpu', root=tmp_path)
    assert list(st['points'].seed) == [10]
