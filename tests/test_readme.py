"The README is a user's document: its results table is generated from figures/results.md, and it tells no history."
import re
from pathlib import Path
from vtp_nbdev.figures import readme_results

ROOT = Path(__file__).parents[1]


def test_readme_results_match_the_store():
    readme = (ROOT/'README.md').read_text()
    regenerated = readme_results(readme, (ROOT/'figures'/'results.md').read_text())
    assert readme == regenerated, "README's results block differs from figures/results.md: run results_summary (cpu)"


def test_user_documents_tell_no_development_history():
    pattern = re.compile(r'\bsessions?\b|issue #|\blent\b|\bsince fixed\b|\bfirst loan\b', re.I)
    files = [ROOT/'README.md', *sorted((ROOT/'figures').glob('*.md')), *sorted((ROOT/'benchmarks').glob('*.py'))]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, '\n'.join(hits)
    assert not list((ROOT/'figures').glob('benchmarks_session*')), 'benchmark history files in figures/'
