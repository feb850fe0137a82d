"""Stage the documentation site (README, rendered notebooks, one API page per module) and build it into `site/`."""
import argparse, ast, json, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT/'_site_src'
RENDERED = ROOT/'rendered'

def notebook_title(nb: Path) -> str:
    "The notebook's first markdown heading, else its file name."
    for c in json.loads(nb.read_text())['cells']:
        if c['cell_type'] == 'markdown':
            for line in ''.join(c['source']).splitlines():
                if line.startswith('# '):
                    return line[2:].strip()
    return nb.stem

def shown_copy(src: Path) -> Path:
    "The rendered copy of notebook `src` (under rendered/, same relative path), else the output-free source."
    rendered = RENDERED/src.relative_to(ROOT)
    return rendered if rendered.exists() else src

def repro_order() -> list:
    "Reproduction notebooks in the order the batch runs them."
    sys.path.insert(0, str(ROOT))
    from vtp_nbdev.repro import repro_notebooks
    return repro_notebooks(ROOT)

def api_modules() -> list:
    "Modules of the package with a docstring, in file-name order (private ones left out)."
    mods = []
    for p in sorted((ROOT/'vtp_nbdev').glob('*.py')):
        if not p.name.startswith('_'):
            mods.append((p.stem, ast.get_docstring(ast.parse(p.read_text())) or ''))
    return mods

_LIST_ITEM = re.compile(r'^( *)([-*+]|\d+\.) ')

def python_markdown_lists(text: str) -> str:
    "GitHub-style markdown lists as Python-Markdown reads them: a blank line before a list, nested items by 4 spaces."
    out, fence, prev_item = [], False, False
    for line in text.splitlines():
        if line.lstrip().startswith('```'):
            fence = not fence
        m = None if fence else _LIST_ITEM.match(line)
        if m:
            if out and out[-1].strip() and not prev_item:
                out.append('')
            line = ' ' * (2 * len(m[1])) + line[len(m[1]):]
        elif prev_item and line.startswith(' ') and line.strip():
            line = ' ' * (2 * (len(line) - len(line.lstrip()))) + line.lstrip()    # continuation of a nested item
        prev_item = bool(m) or (prev_item and line.startswith(' ') and bool(line.strip()))
        out.append(line)
    return '\n'.join(out) + '\n'

def stage() -> dict:
    "Write the pages into `_site_src/docs/` and a configuration with the navigation; the navigation."
    shutil.rmtree(STAGE, ignore_errors=True)
    docs = STAGE/'docs'
    (docs/'library').mkdir(parents=True)
    (docs/'reproduction').mkdir()
    (docs/'api').mkdir()
    (docs/'index.md').write_text(python_markdown_lists((ROOT/'README.md').read_text()))
    nav = [{'Home': 'index.md'}]
    stale = []
    for section, folder, nbs in (('Library', 'library', sorted(p for p in (ROOT/'nbs').glob('*.ipynb')
                                                                if not p.name.startswith('_'))),
                                 ('Reproduction', 'reproduction', repro_order())):
        pages = []
        for nb in nbs:
            shown = shown_copy(nb)
            if shown == nb:
                stale.append(str(nb.relative_to(ROOT)))
            shutil.copy2(shown, docs/folder/nb.name)
            pages.append({f'{nb.stem}: {notebook_title(nb)}': f'{folder}/{nb.name}'})
        nav.append({section: pages})
    api = []
    for mod, doc in api_modules():
        (docs/'api'/f'{mod}.md').write_text(f'# vtp_nbdev.{mod}\n\n::: vtp_nbdev.{mod}\n')
        api.append({mod: f'api/{mod}.md'})
    nav.append({'API': api})
    cfg = dict(INHERIT='../mkdocs.yml', docs_dir='docs', site_dir=str(ROOT/'site'), nav=nav)
    (STAGE/'mkdocs.yml').write_text(json.dumps(cfg, indent=1) + '\n')   # JSON is YAML
    manifest = RENDERED/'manifest.json'
    not_rendered = json.loads(manifest.read_text())['not_rendered'] if manifest.exists() else {}
    for s in stale:
        why = not_rendered.get(Path(s).stem, 'run `make render`')
        print(f'{s} shown without outputs ({why})')
    return nav

def main(argv=None):
    "Stage the pages and run `mkdocs build` (strict: a broken reference in a page fails the build)."
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--stage-only', action='store_true', help='write _site_src/ without building')
    a = p.parse_args(argv)
    stage()
    if not a.stage_only:
        subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--quiet', '-f', str(STAGE/'mkdocs.yml')],
                       cwd=ROOT, check=True, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
        print(f'site built: {ROOT/"site"/"index.html"}')

if __name__ == '__main__':
    main()
