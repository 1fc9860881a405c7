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
