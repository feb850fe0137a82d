"The testbed diagnostics' text (vtp_nbdev.diagnostics): the committed cpu records give the committed cpu report."
import json
from pathlib import Path
import pytest
from vtp_nbdev.diagnostics import (DiagnosticsSetup, diagnostics_findings, protocol_settings, diagnostics_report,
                                   diagnostics_notes, stored_point_gfd, noise_summary)
from vtp_nbdev.scaling import load_results
from vtp_nbdev.testbed import headline_points, stored_series_section

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT/'results'/'cpu'/'diagnostics'
FIGURES = ROOT/'figures'


def _records() -> dict:
    "The cpu scale's stored diagnostics records (noise, probes, latents)."
    return {n: json.loads((RECORDS/f'{n}.json').read_text()) for n in ('noise', 'probes', 'latents')}


@pytest.mark.skipif(not (RECORDS/'latents.json').exists(), reason='no cpu diagnostics in the results store')
def test_cpu_report_from_stored_records():
    tb, r = DiagnosticsSetup('cpu'), _records()
    findings = diagnostics_findings(tb, r['noise'], r['probes'], r['latents'], stored_point_gfd(tb))
    proposal = protocol_settings(tb, r['noise'], r['probes'], r['latents'])
    report = diagnostics_report('cpu', tb.dataset, r['noise'], r['probes'], r['latents'], findings, proposal)
    series = stored_series_section(headline_points(load_results('cpu'), 'cpu'))   # as the notebook appends it
    report += f'\n## What the stored scaling series shows (exploratory)\n\n{series}'
    assert report == (FIGURES/'testbed_diagnostics.md').read_text()
    notes = diagnostics_notes(r['noise'], r['probes'], r['latents'], findings)
    assert notes == json.loads((FIGURES/'testbed_diagnostics_verdict.json').read_text())['notes']


@pytest.mark.skipif(not (RECORDS/'noise.json').exists(), reason='no cpu diagnostics in the results store')
def test_findings_follow_the_noise_record():
    tb, r = DiagnosticsSetup('cpu'), _records()
    text = diagnostics_findings(tb, r['noise'], None, None)
    sigma = noise_summary(r['noise'])['sigma_dit']
    assert f"σ_DiT = {sigma:.2f}" in text
    r['noise']['seeds'][0]['fd_1k'] += 10.
    changed = diagnostics_findings(tb, r['noise'], None, None)
    assert changed != text and f"σ_DiT = {noise_summary(r['noise'])['sigma_dit']:.2f}" in changed
