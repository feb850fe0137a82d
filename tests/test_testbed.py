"The testbed preconditions (vtp_nbdev.testbed): proxy noise and named preconditions read from a results store."
import json
import pandas as pd
from vtp_nbdev.testbed import measured_noise, testbed_preconditions as preconditions


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
