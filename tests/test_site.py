"""The documentation site in `site/` (built by `make docs`): every internal link resolves, the headline figure shows."""
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

SITE = Path(__file__).resolve().parent.parent/'site'
pytestmark = pytest.mark.skipif(not (SITE/'index.html').exists(), reason='site/ not built (make docs)')

class _Page(HTMLParser):
    "Links (href/src) and element ids of one HTML page."
    def __init__(self):
        super().__init__()
        self.links, self.ids, self.images = [], set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'):
            self.ids.add(a['id'])
        if tag == 'a' and a.get('name'):
            self.ids.add(a['name'])
        for k in ('href', 'src'):
            if a.get(k) is not None:
                self.links.append(a[k])
        if tag == 'img':
            self.images.append(a.get('src', ''))

def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(errors='replace'))
    return p

def _target(site: Path, page: Path, link: str):
    "(file, fragment) an internal link of `page` points to (absolute paths from `site`); None for external ones."
    u = urlsplit(link)
    if u.scheme or u.netloc or link.startswith(('mailto:', 'javascript:', 'data:')):
        return None
    base = site if u.path.startswith('/') else page.parent
    f = page if not u.path else (base/unquote(u.path).lstrip('/')).resolve()
    if f.is_dir() or u.path.endswith('/'):
        f = f/'index.html'
    return f, unquote(u.fragment)

def broken_links(site: Path) -> list:
    "'page: link (why)' for every internal link under `site` whose file or anchor does not exist."
    site = site.resolve()
    pages = {p.resolve(): _parse(p) for p in site.rglob('*.html')}
    bad = []
    for page, parsed in pages.items():
        for link in parsed.links:
            t = _target(site, page, link)
            if t is None:
                continue
            f, frag = t
            if not f.exists():
                bad.append(f'{page.relative_to(site)}: {link} (no file {f})')
            elif frag and f.suffix == '.html' and f in pages and frag not in pages[f].ids:
                bad.append(f'{page.relative_to(site)}: {link} (no anchor #{frag})')
    return bad

def test_link_checker_finds_a_broken_link(tmp_path):
    (tmp_path/'a').mkdir()
    (tmp_path/'index.html').write_text('<a href="a/">ok</a> <a href="b/">missing</a> <a href="#top">anchor</a>'
                                       '<a href="https://example.org/x">external</a>'
                                       '<h1 id="h">t</h1><a href="#h">ok</a>')
    (tmp_path/'a'/'index.html').write_text('<a href="../index.html#h">ok</a>')
    assert [b.split(' (')[0] for b in broken_links(tmp_path)] == ['index.html: b/', 'index.html: #top']

def test_every_internal_link_resolves():
    bad = broken_links(SITE)
    assert not bad, f'{len(bad)} broken internal links, e.g.:\n' + '\n'.join(bad[:20])

def test_headline_figure_shows():
    page = SITE/'reproduction'/'fig_training_scaling'/'index.html'
    assert page.exists(), f'no page {page}'
    pngs = [s for s in _parse(page).images if s.startswith('data:image/png;base64,') and len(s) > 10_000]
    assert pngs, f'{page} shows no PNG figure: its notebook has no rendered copy (make render)'

def test_navigation_has_every_section():
    text = (SITE/'index.html').read_text()
    for section in ('Library', 'Reproduction', 'API'):
        assert section in text, f'no {section} in the navigation of {SITE/"index.html"}'
    api = SITE/'api'/'repro'/'index.html'
    assert api.exists() and 'render_notebooks' in api.read_text(), f'{api}: no API of vtp_nbdev.repro'
