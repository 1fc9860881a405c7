"""The syllabus is linked from README and lists every chapter with its notebook and exercises."""

from __future__ import annotations

import pathlib
import re

from lowrank_ref.exercises import CHECKS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_links_the_syllabus():
    assert "(chapters/README.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_chapter_is_a_unit_and_every_link_resolves():
    text = (ROOT / "chapters" / "README.md").read_text(encoding="utf-8")
    chapters = sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]-*.md"))
    for ch in chapters:
        assert f"]({ch}.md)" in text, ch
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / "chapters" / target).exists(), target
    # the exercise names it lists are the ones that are checked
    for ch, items in CHECKS.items():
        for name, _ in items:
            assert f"`{name}`" in text, (ch, name)


def test_claims_table_rows_have_a_verdict_and_resolvable_links():
    text = (ROOT / "chapters" / "90-claims.md").read_text(encoding="utf-8")
    assert "(chapters/90-claims.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## The claims")[1].split("\n## ")[0]
    rows = [ln for ln in table.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert len(rows) >= 21
    verdicts = ("holds", "wrong", "not measured yet", "not seen here", "not decided here")
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 6, ln
        assert any(v in cells[4] for v in verdicts), ln
        # a row is either measured (it names where) or says it is not measured yet
        assert cells[5] != "—" or "not measured yet" in cells[4], ln
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (ROOT / "chapters" / target).exists(), target


def _slug(heading: str) -> str:  # GitHub's anchor for a Markdown heading
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_claims_table_anchors_exist():
    text = (ROOT / "chapters" / "90-claims.md").read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)#]+)#([^)]+)\)", text):
        doc = (ROOT / "chapters" / target).read_text(encoding="utf-8")
        slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
        assert anchor in slugs, (target, anchor)
