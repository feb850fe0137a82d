"The pilot's pure parts (vtp_nbdev.pilot): the power table of the stored cpu series and the proxy-budget reading."
import math
import numpy as np
import pandas as pd
import pytest
from vtp_nbdev.scaling import load_results
from vtp_nbdev.testbed import headline_points
from vtp_nbdev.stats import per_seed_slopes, nominal_budgets, t_test_power
from vtp_nbdev.pilot import primary_quantities, power_table, proxy_budgets, suggest_proxy_step, budget_label
from vtp_nbdev.diagnostics import DiagnosticsSetup


@pytest.fixture(scope='module')
def cpu_points():
    pts = headline_points(load_results('cpu'), 'cpu')
    if pts is None or not len(pts):
        pytest.skip('no stored cpu scaling points')
    return pts


def test_primary_quantities_read_the_store(cpu_points):
    q = primary_quantities(cpu_points).set_index('quantity')
    pts = cpu_points.assign(flops=nominal_budgets(cpu_points.flops))
    ae = per_seed_slopes(pts[pts.method == 'AE'], 'gFD')
    vtp = per_seed_slopes(pts[pts.method == 'CLIP+SSL+AE'], 'gFD')
    assert q.loc['AE gFD slope per 10x', 'mean'] == pytest.approx(np.mean(list(ae.values())))
    assert q.loc['CLIP+SSL+AE gFD slope per 10x', 'sd'] == pytest.approx(np.std(list(vtp.values()), ddof=1))
    diff = [vtp[s] - ae[s] for s in sorted(set(ae) & set(vtp))]
    assert q.loc['gFD slope difference CLIP+SSL+AE - AE', 'mean'] == pytest.approx(np.mean(diff))
    assert (q.n >= 2).all()


def test_power_table_seeds_reach_power(cpu_points):
    pt = power_table(cpu_points, effects=(1., 4.))
    t = pt[(pt.test == 'paired t, two-sided') & pt.seeds.notna()]
    assert len(t) >= 4
    for _, r in t.iterrows():
        n = int(r.seeds)
        assert t_test_power(r.effect, r.sd, n) >= 0.8
        if n > 2:
            assert t_test_power(r.effect, r.sd, n - 1) < 0.8
    margins = pt[pt.effect_is == 'margin'].sort_values('effect')
    assert len(margins) == 3 and margins.seeds.is_monotonic_decreasing


def test_budget_reading_and_labels():
    cv = pd.DataFrame(dict(step=[200, 200, 1600, 1600], tokenizer=['AE C', 'VTP C'] * 2, gFD=[20., 30., 8., 12.],
                           rFD=[3.5, 8., 3.5, 8.], sample_shape_accuracy=[.21, .3, .6, .7], shape_chance=[.2] * 4,
                           n_samples=[5000] * 4))
    b = proxy_budgets(cv)
    assert b.far_harder.tolist() == [True, False] and b.shows_shape.tolist() == [False, True]
    assert suggest_proxy_step(b) == 200
    tb = DiagnosticsSetup('cpu', 1)
    assert [budget_label(tb, f) for f in (tb.budgets[0], tb.budgets[-1])] == ['C', '16C']
