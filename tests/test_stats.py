"The noise model (vtp_nbdev.stats): Student-t against closed forms and tables, paired tests, verdict rules, fits."
import math
import numpy as np
import pandas as pd
import pytest
from vtp_nbdev.stats import (betainc, t_cdf, t_sf, t_ppf, seed_sd, seed_stats, combine_sd, slope_per_decade,
                             per_seed_slopes, paired_slope_test, single_seed_threshold, single_seed_effect, decide,
                             slope_verdict, single_seed_verdict, partial_correlation, fit_power_law)


@pytest.mark.parametrize('df,q', [(1, 12.7062047362), (2, 4.3026527297), (3, 3.1824463053), (5, 2.5705818366),
                                  (10, 2.2281388520), (30, 2.0422724563), (120, 1.9799304050)])
def test_t_ppf_matches_tables(df, q):
    assert t_ppf(0.975, df) == pytest.approx(q, abs=1e-7)
    assert t_ppf(0.025, df) == pytest.approx(-q, abs=1e-7)


@pytest.mark.parametrize('t', [-20., -2., -0.3, 0., 0.3, 2., 20.])
def test_t_cdf_closed_forms(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    x = math.atan(t / math.sqrt(3))                      # df = 3
    assert t_cdf(t, 3) == pytest.approx(0.5 + (x + math.sin(x) * math.cos(x)) / math.pi, abs=1e-12)


def test_t_tails_and_large_df_approach_normal():
    assert t_sf(2.0, 5) == pytest.approx(0.0509697394, abs=1e-9)
    assert t_cdf(1.959963985, 1e7) == pytest.approx(0.975, abs=1e-6)
    assert t_cdf(float('inf'), 3) == 1.0 and t_cdf(float('-inf'), 3) == 0.0


def test_betainc_binomial_identity():
    # I_p(k, n - k + 1) = P(Binomial(n, p) >= k)
    n, p = 7, 0.35
    for k in range(1, n + 1):
        want = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert betainc(k, n - k + 1, p) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match=r'outside \[0, 1\]'):
        betainc(1, 1, 1.5)


def test_seed_stats_ddof1_and_interval():
    s = seed_stats([1., 2., 3., 4.])
    assert s['sd'] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s['ci_hi'] - s['mean'] == pytest.approx(3.1824463053 * s['sd'] / 2, rel=1e-8)
    assert math.isnan(seed_stats([3.])['ci_lo']) and math.isnan(seed_sd([]))
    assert combine_sd(1., 2., 2.) == pytest.approx(3.)


def test_slopes_and_paired_test_hand_computed():
    assert slope_per_decade([1e9, 1e10, 1e11, 1e12], [4., 3., 2., 1.]) == pytest.approx(-1.)
    df = pd.DataFrame(dict(seed=[0] * 3 + [1] * 3, flops=[1e9, 1e10, 1e11] * 2, y=[9., 7., 5., 8., 8., 8.]))
    s = per_seed_slopes(df, 'y')
    assert s[0] == pytest.approx(-2.) and s[1] == pytest.approx(0., abs=1e-12)
    # differences (-1, -2, -3, -2): mean -2, sd sqrt(2/3), t = -2 / (sqrt(2/3) / 2) = -4.898979
    r = paired_slope_test({i: 0. for i in range(4)}, {0: 1., 1: 2., 2: 3., 3: 2.}, 'less')
    assert r['t'] == pytest.approx(-4.898979486, abs=1e-8) and r['df'] == 3
    x = math.atan(r['t'] / math.sqrt(3))
    assert r['p'] == pytest.approx(0.5 + (x + math.sin(x) * math.cos(x)) / math.pi, abs=1e-12)
    with pytest.raises(ValueError, match='alternative'):
        paired_slope_test({}, {}, 'two-sided')


def test_single_seed_rule():
    assert single_seed_threshold(2.) == pytest.approx(4 * math.sqrt(2))
    assert single_seed_effect(5.7, 2.) is True and single_seed_effect(5.6, 2.) is False
    assert single_seed_effect(1., float('nan')) is None


def test_verdicts_name_rule_and_failed_preconditions():
    v = decide('claim', 'rule X', True, preconditions={'enough seeds': False, 'noise measured': True})
    assert v.word == 'INCONCLUSIVE' and v.failed == ['enough seeds'] and 'rule X' in str(v)
    assert v.to_dict()['failed_preconditions'] == ['enough seeds']
    fast, slow = {0: -9., 1: -10., 2: -11.}, {0: 0., 1: -1., 2: 1.}
    assert slope_verdict('VTP scales better', fast, slow).word == 'REPRODUCED'
    assert slope_verdict('VTP scales better', slow, fast).word == 'REFUTED'
    v = slope_verdict('VTP scales better', {0: -9., 1: -10.}, {0: 0., 1: -1.})
    assert v.word == 'INCONCLUSIVE' and v.failed == ['>= 3 paired seeds (have 2)']
    assert single_seed_verdict('better', 10., 1., sigma_seeds=1).failed == ['SD from >= 3 seeds (have 1)']
    assert single_seed_verdict('better', float('nan'), float('nan')).word == 'INCONCLUSIVE'


def test_partial_correlation_matches_formula():
    rng = np.random.default_rng(1)
    c = 10 ** rng.uniform(8, 12, 50)
    z = np.log10(c)
    x, y = z + rng.normal(0, 1, 50), 2 * z + rng.normal(0, 1, 50)
    y = y + 0.5 * x
    r = partial_correlation(x, y, c)
    rxy, rxz, ryz = np.corrcoef(x, y)[0, 1], np.corrcoef(x, z)[0, 1], np.corrcoef(y, z)[0, 1]
    assert r['r'] == pytest.approx((rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)), abs=1e-10)
    assert r['df'] == 47 and r['p'] < 0.01


def test_power_law_needs_four_budgets():
    with pytest.raises(ValueError, match='at least 4'):
        fit_power_law([1, 1, 10, 10, 100, 100], [3, 3, 2, 2, 1, 1])
    c = np.array([1e9, 1e10, 1e11, 1e12])
    f = fit_power_law(c, 7 * c ** -0.1, n_boot=200)
    assert f['b'] == pytest.approx(-0.1) and f['b_lo'] == pytest.approx(-0.1) and f['n_budgets'] == 4
    assert f['change_per_10x'] == pytest.approx(10 ** -0.1 - 1)


def test_slope_summary_and_verdict_lines():
    from vtp_nbdev.stats import slope_summary, verdict_lines
    d = pd.DataFrame(dict(method=['A'] * 6, seed=[0, 0, 0, 1, 1, 1], flops=[1e9, 1e10, 1e11] * 2,
                          gFD=[30., 20., 10., 32., 22., 12.]))
    s = slope_summary(d, 'gFD')['A']
    assert s['n'] == 2 and s['n_budgets'] == 3 and abs(s['mean'] + 10) < 1e-9
    assert verdict_lines([decide('c', 'r', True)]).startswith('- REPRODUCED: c [rule: r]')


def synthetic_points(effect: bool, n_seeds: int, seed: int = 0) -> pd.DataFrame:
    "A synthetic store: VTP gFD falls from 40 by C^-0.15; the AE stays at 30 (effect) or equals VTP (no effect)."
    rng = np.random.default_rng(seed)
    budgets = (4e12, 8e12, 16e12, 32e12, 64e12)
    rows = []
    for m in ('AE', 'CLIP+SSL+AE'):
        for s in range(n_seeds):
            off = rng.normal(0, 1.)
            for c in budgets:
                c = c * (1 + rng.uniform(-0.002, 0.002))
                vtp = 40 * (c / budgets[0]) ** -0.15
                mean = 30. if effect and m == 'AE' else vtp
                rows.append(dict(method=m, seed=s, flops=c, gFD=mean + off + rng.normal(0, 0.5)))
    return pd.DataFrame(rows)


def test_t_critical_and_single_run_false_positive_rate():
    from vtp_nbdev.stats import t_critical, single_run_test, SINGLE_SEED_FACTOR
    assert t_critical(0.05, 2) == pytest.approx(4.3026527297, abs=1e-8)
    rng = np.random.default_rng(1)
    draws = 4000
    sig = rng.normal(0, 1, (draws, 3)).std(1, ddof=1)
    delta = rng.normal(0, 1, draws) - rng.normal(0, 1, draws)
    old = np.mean(np.abs(delta) > SINGLE_SEED_FACTOR * sig)
    new = np.mean([single_run_test(d, s, 2)['significant'] for d, s in zip(delta, sig)])
    assert 0.15 < old < 0.22 and 0.035 < new < 0.065, (old, new)


def test_budgets_counted_by_nominal_budget():
    from vtp_nbdev.stats import nominal_budgets
    pts = synthetic_points(True, 3)
    assert pts.flops.nunique() == 30 and len(np.unique(nominal_budgets(pts.flops))) == 5
    few = pts[pts.flops < 2e13]
    with pytest.raises(ValueError, match='3 distinct compute budgets'):
        fit_power_law(few.flops, few.gFD)
    f = fit_power_law(pts.flops, pts.gFD, n_boot=200, seeds=pts.seed)
    assert f['n_budgets'] == 5 and f['bootstrap'] == 'seed'


def test_equivalence_holm_power():
    from vtp_nbdev.stats import tost_slope, holm, seeds_for_power, t_test_power
    assert tost_slope({0: 0.1, 1: -0.2, 2: 0.05, 3: 0.}, 1.)['equivalent']
    assert not tost_slope({0: 3., 1: -4., 2: 2.}, 1.)['equivalent']
    assert [r['reject'] for r in holm([0.01, 0.04, 0.03, 0.005])] == [True, False, False, True]
    assert t_test_power(1., 1., 10) == pytest.approx(0.8031, abs=2e-4)
    assert seeds_for_power(0.5, 1.) == 34 and seeds_for_power(1., 1., paired=False) == 17


@pytest.mark.parametrize('effect,n_seeds,want', [
    (True, 5, ['REPRODUCED'] * 5),
    (False, 5, ['REPRODUCED', 'REFUTED', 'not REPRODUCED', 'not REPRODUCED', 'not REPRODUCED']),
    (True, 2, ['INCONCLUSIVE'] * 5)])
def test_scaling_family_on_synthetic_stores(effect, n_seeds, want):
    from vtp_nbdev.stats import scaling_family, decide_family
    got = [v.word for v in decide_family(scaling_family(synthetic_points(effect, n_seeds), margin=2., n_boot=300))]
    for g, w in zip(got, want):
        assert g != 'REPRODUCED' if w == 'not REPRODUCED' else g == w, (got, want)
