"""MkDocs hooks of the book (book/build.py adds this file to the configuration)."""

from __future__ import annotations

import re

HEADING_ID_RE = re.compile(r"<h([1-6])\b[^>]*\bid=\"([^\"]+)\"")


def _flatten(items):
    for item in items:
        yield item
        yield from _flatten(item.children)


def on_page_content(html, page, config, files):
    """A notebook page's table of contents links to the ids its headings really have.

    mkdocs-jupyter makes the table of contents from the notebook's markdown with its own slugs,
    which drop inline code (`### 5.4 Initialisation of \\`A\\`` -> `#54-initialisation-of`), while
    nbconvert gives the heading `id="54-initialisation-of-a"`: the links went nowhere. The two
    list the same headings in the same order, so the ids are taken from the page itself.
    """
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    ids = [(int(level), hid) for level, hid in HEADING_ID_RE.findall(html)]
    toc = list(_flatten(page.toc.items))
    if len(toc) == len(ids) and all(item.level == level for item, (level, _) in zip(toc, ids)):
        for item, (_, hid) in zip(toc, ids):
            item.id = hid
    return html
