"The README: a short user's document, its results block from figures/results.md, its numbers from the files it cites."
import re
from pathlib import Path
from vtp_nbdev.figures import README_MARKERS, readme_results

ROOT = Path(__file__).parents[1]


def test_readme_results_match_the_store():
    readme = (ROOT/'README.md').read_text()
    regenerated = readme_results(readme, (ROOT/'figures'/'results.md').read_text())
    assert readme == regenerated, "README's results block differs from figures/results.md: run results_summary (cpu)"


def readme_prose():
    "The README without its generated results block."
    readme = (ROOT/'README.md').read_text()
    begin, end = README_MARKERS
    return readme.split(begin)[0] + readme.split(end)[1]


def test_readme_is_short_and_undated():
    "A user's README: about 175 lines, prose lines of at most 120 characters, no dated 'current numbers'."
    readme = (ROOT/'README.md').read_text()
    assert len(readme.splitlines()) <= 200, f"README has {len(readme.splitlines())} lines; keep it near 175"
    long = [line[:60] for line in readme_prose().splitlines() if len(line) > 120 and not line.startswith('|')]
    assert not long, f"README prose lines over 120 characters: {long}"
    dates = re.findall(r'\b20\d\d-\d\d-\d\d\b', readme_prose())
    assert not dates, f"README states dates {dates}: numbers belong to the generated files that date them"


def test_readme_numbers_come_from_the_figures_they_cite():
    "Every decimal number in a README paragraph or bullet that cites `figures/*.md` occurs in one of those files."
    checked = 0
    for chunk in re.split(r'\n(?=- )|\n\n', readme_prose()):
        cited = sorted(set(re.findall(r'figures/[\w.]+\.md', chunk)))
        if not cited:
            continue
        assert all((ROOT/c).is_file() for c in cited), f"README cites a missing file: {cited}"
        sources = ''.join((ROOT/c).read_text() for c in cited)
        for number in re.findall(r'(?<![\w.,])\d+\.\d+(?![\w.])', chunk):
            assert number in sources, f"README number {number} is in none of {cited}: {chunk[:120]!r}"
            checked += 1
    assert checked >= 5, f"only {checked} README numbers cite a figures file: the check lost its subject"


def test_user_documents_tell_no_development_history():
    pattern = re.compile(r'\bsessions?\b|issue #|\blent\b|\bsince fixed\b|\bfirst loan\b', re.I)
    files = [ROOT/'README.md', *sorted((ROOT/'figures').glob('*.md')), *sorted((ROOT/'benchmarks').glob('*.py')),
             *sorted((ROOT/'nbs').rglob('*.ipynb')), *sorted((ROOT/'vtp_nbdev').glob('*.py'))]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, '\n'.join(hits)
    assert not list((ROOT/'figures').glob('benchmarks_session*')), 'benchmark history files in figures/'


QUICK_START_SMALL = {          # README value -> a test-sized value (every key must occur: README edits update this test)
    "steps=300))": "steps=3, log_every=1))",
    "evaluate_tokenizer(run/'final', 'shapes')":
        "evaluate_tokenizer(run/'final', 'shapes', n_zero_shot=40, n_probe_train=64, n_probe_test=32, n_rec=32)",
    "n=5000)": "n=64)",
    "steps=500)": "steps=3, batch=16, log_every=1, ckpt_every=3)",
    "n=16, steps=50)": "n=4, steps=2)",
}


def test_quick_start_runs(tmp_path, monkeypatch):
    "The README's quick start, with test-sized numbers, runs end to end and returns what its comments say."
    readme = (ROOT/'README.md').read_text()
    block = re.search(r'## Quick start\n\n```python\n(.*?)```', readme, re.S)
    assert block, "README has no python block under '## Quick start'"
    code = block[1]
    for old, new in QUICK_START_SMALL.items():
        assert code.count(old) == 1, f"quick start: expected {old!r} once"
        code = code.replace(old, new)
    monkeypatch.setenv('VTP_RUNS_DIR', str(tmp_path))
    ns = {}
    exec(compile(code, 'README.md quick start', 'exec'), ns)
    assert (ns['run']/'final'/'model.safetensors').is_file()
    m = ns['metrics']
    assert not m['notes'] and m['reconstruction']['psnr'] > 0 and m['reconstruction']['rFID'] is not None
    assert 'linear_probe_bottleneck_top1' in m['linear_probe'] and 'zero_shot_top1_heldout' in m['zero_shot']
    assert (ns['dit']/'final').is_dir()
    assert tuple(ns['images'].shape) == (4, 3, 32, 32) and str(ns['images'].dtype) == 'torch.uint8'
    assert len(ns['labels']) == 4
