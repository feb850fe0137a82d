"The testbed preconditions (vtp_nbdev.testbed): proxy noise and named preconditions read from a results store."
import json
import numpy as np
import pandas as pd
import pytest
from vtp_nbdev.testbed import measured_noise, testbed_preconditions as preconditions
from vtp_nbdev.testbed import (decoder_catch_up, semantic_generation, stored_series_section, stored_series_table,
                               stored_series_findings)


def test_preconditions_from_stored_diagnostics(tmp_path):
    (tmp_path/'settings.ini').write_text('')
    assert measured_noise('smoke', root=tmp_path)['n_seeds'] == 0
    pts = pd.DataFrame(dict(method=['AE', 'AE'], flops=[1e9, 1e10], rFD=[20., 1.], gFD=[40., 30.]))
    pre = preconditions(pts, 'smoke', root=tmp_path)
    assert [k.split(':')[0] for k, ok in pre.items() if not ok] == ['regime', 'semantics', 'proxy']
    dg = tmp_path/'results'/'smoke'/'diagnostics'
    dg.mkdir(parents=True)
    seeds = [dict(fd_1k=f, fd_1k_half_steps=f + 3) for f in (25., 26., 24.)]
    (dg/'noise.json').write_text(json.dumps(dict(seeds=seeds, dit_steps=8, half_steps=4)))
    ns = measured_noise('smoke', root=tmp_path)
    assert ns['n_seeds'] == 3 and abs(ns['sigma'] - 1) < 1e-12 and abs(ns['step_gain']['mean'] - 3) < 1e-12


def series(rfd_slope: dict, gap: dict, share_step: dict, seeds=(0, 1, 2), budgets=(1e10, 2e10, 4e10)):
    "Points: rFD = 10 + slope x log10(budget / first) + seed, gFD = rFD + gap, shape share rising share_step a budget."
    rows = []
    for m, slope in rfd_slope.items():
        for s in seeds:
            for i, f in enumerate(budgets):
                rfd = 10 + slope * np.log10(f / budgets[0]) + s
                rows.append(dict(scale='smoke', method=m, seed=s, flops=f, step=50 * 2 ** i, rFD=rfd, gFD=rfd + gap[m],
                                 sample_shape_accuracy=.4 + share_step[m] * i, sample_colour_accuracy=.98))
    return pd.DataFrame(rows)


def test_decoder_catch_up_separates_the_decoder_from_the_rest():
    pts = series({'AE': -2., 'CLIP+SSL+AE': -8.}, {'AE': 1., 'CLIP+SSL+AE': 4.}, {'AE': 0., 'CLIP+SSL+AE': .1})
    cu = decoder_catch_up(pts)
    assert abs(cu['r'] - 1) < 1e-9 and all(abs(r - 1) < 1e-9 for r in cu['r_seed'].values())
    assert abs(cu['gap_slope_diff']['diff']) < 1e-9           # gFD - rFD constant for both: no difference left
    assert abs(cu['gfd_slope_diff']['diff'] + 6) < 1e-6       # raw gFD: -8 against -2 per 10x
    assert abs(cu['slope_rfd']['mean'] + 8) < 1e-6 and abs(cu['slope_gfd']['mean'] + 8) < 1e-6
    assert np.allclose(cu['gap']['CLIP+SSL+AE'], 4) and np.allclose(cu['gap']['AE'], 1)
    ae_rec, ae_batch = cu['rec_batch']['AE']
    vtp_rec, vtp_batch = cu['rec_batch']['CLIP+SSL+AE']
    assert ae_rec == ae_batch and vtp_rec < vtp_batch          # the AE reconstructs its whole batch
    assert cu['rec_images']['AE'] == [50. * ae_rec, 100. * ae_rec, 200. * ae_rec]
    assert abs(cu['images_ratio'] - ae_rec / vtp_rec) < 1e-9 and cu['steps_ratio'] == 1


def test_semantic_generation_shares_by_budget():
    pts = series({'AE': -2., 'CLIP+SSL+AE': -8.}, {'AE': 1., 'CLIP+SSL+AE': 4.}, {'AE': -.05, 'CLIP+SSL+AE': .1})
    sg = semantic_generation(pts)
    assert np.allclose(sg['share']['AE'], [40, 35, 30]) and np.allclose(sg['share']['CLIP+SSL+AE'], [40, 50, 60])
    assert np.allclose(sg['vtp_minus_ae'], [0, 15, 30])
    assert abs(sg['slope']['AE']['mean'] + 5 / np.log10(2)) < 1e-6 and sg['slope']['AE']['agree']
    assert np.isclose(sg['colour']['mean'], 98) and sg['labels'] == ['C', '2C', '4C']
    assert sg['r_share_rfd'] < -0.5                           # VTP's share rises as its rFD falls
    table = stored_series_table(decoder_catch_up(pts), sg)
    assert list(table['shape % VTP-AE']) == [0, 15, 30]
    assert stored_series_findings(decoder_catch_up(pts), sg).startswith('Exploratory')


@pytest.mark.parametrize('fn', [decoder_catch_up, semantic_generation])
def test_series_readings_name_what_is_missing(fn):
    pts = series({'AE': -2., 'CLIP+SSL+AE': -8.}, {'AE': 1., 'CLIP+SSL+AE': 4.}, {'AE': 0., 'CLIP+SSL+AE': .1})
    with pytest.raises(ValueError, match=r"lack column\(s\) \['gFD'\]"):
        fn(pts.drop(columns='gFD'))
    with pytest.raises(ValueError, match="no points of method 'AE'"):
        fn(pts[pts.method != 'AE'])
    with pytest.raises(ValueError, match="no points of method 'VTP'"):
        fn(pts, vtp='VTP')
    with pytest.raises(ValueError, match='no points given'):
        fn(pts.iloc[:0])
    assert 'Not computed from this store' in stored_series_section(pts.drop(columns='gFD'))
