"""mkdocs hooks: notebook pages get the anchors their table of contents links to."""
import re
from markdown.extensions.toc import slugify

_HEADING = re.compile(r'<h([1-6])([^>]*?)\sid="([^"]+)"([^>]*)>(.*?)</h\1>', re.S)

def toc_anchor(inner_html: str) -> str:
    "The id Python-Markdown's table of contents gives a heading (its text without code spans, slugified)."
    text = re.sub(r'<code>.*?</code>', '', inner_html, flags=re.S)
    text = re.sub(r'<[^>]+>', '', text).replace('¶', '')
    return slugify(text, '-')

def on_page_content(html, page, config, files):
    "Add the table of contents' anchor to each notebook heading whose own id differs (headings with code)."
    if not page.file.src_path.endswith('.ipynb'):
        return html
    ids = set(re.findall(r'\sid="([^"]+)"', html))
    def add_anchor(m):
        anchor = toc_anchor(m[5])
        if not anchor or anchor in ids:
            return m[0]
        ids.add(anchor)
        return f'<span id="{anchor}"></span>{m[0]}'
    return _HEADING.sub(add_anchor, html)
