"""Rendered notebooks: a render from an unchanged tree is byte-identical, and the committed copies match the sources."""
import json
from pathlib import Path
import pytest
from vtp_nbdev.repro import render_notebooks, render_plan, RENDER_DIR

ROOT = Path(__file__).resolve().parent.parent

def _sources(nb: Path) -> list:
    "Cell sources of a notebook, without papermill's injected parameters cell."
    cells = json.loads(nb.read_text())['cells']
    return [''.join(c['source']) for c in cells if 'injected-parameters' not in c.get('metadata', {}).get('tags', [])]

def test_render_twice_is_byte_identical(tmp_path):
    names = '00_config,table3_scalability'              # one library notebook, one store-only reproduction notebook
    for run in ('a', 'b'):
        render_notebooks(names, root=ROOT, out=tmp_path/run)
    files = sorted(p.relative_to(tmp_path/'a') for p in (tmp_path/'a').rglob('*.ipynb'))
    assert files == [Path('nbs/00_config.ipynb'), Path('nbs/repro/table3_scalability.ipynb')]
    for f in files:
        assert (tmp_path/'a'/f).read_bytes() == (tmp_path/'b'/f).read_bytes(), f'{f} differs between two renders'
    nb = json.loads((tmp_path/'a'/'nbs'/'repro'/'table3_scalability.ipynb').read_text())
    outputs = [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c['outputs']]
    assert outputs and all(c.get('execution_count') is None for c in nb['cells'] if c['cell_type'] == 'code')
    assert not nb['metadata'].get('papermill') and 'store_only = True' in ''.join(nb['cells'][2]['source'])
    assert str(tmp_path) not in json.dumps(nb) and str(ROOT) not in json.dumps(nb)

def test_rendered_copies_match_their_sources():
    plan, skipped = render_plan(ROOT)
    stale = [str(src.relative_to(ROOT)) for src, target, params in plan
             if target.exists() and _sources(target) != _sources(src)]
    missing = [str(src.relative_to(ROOT)) for src, target, params in plan if not target.exists()]
    assert not stale and not missing, f'rendered copies out of date {stale} or missing {missing}: run `make render`'
    manifest = json.loads((ROOT/RENDER_DIR/'manifest.json').read_text())
    assert manifest['not_rendered'] == skipped and manifest['scale'] == 'cpu'

def test_render_unknown_notebook_fails():
    with pytest.raises(FileNotFoundError, match="no notebook to render matches"):
        render_notebooks('fig99', root=ROOT)
