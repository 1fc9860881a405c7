"""The book (book/build.py, book/check.py): its table of contents, its links, and a real browser.

The build tests run on small fake checkouts (a chapter or two, three package files linked in) so that
each failure is planted on purpose; the browser tests serve a built site on 127.0.0.1 and open it
in headless Chromium. Without chromium they skip with the reason on a developer's machine, and
fail in CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"book_{name}", ROOT / "book" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _load("build")
check = _load("check")

CHAPTER = r"""# 01 · Fake: a chapter for the tests
<!-- derives: lowrank_ref.adapters.lora.lora_backward, lowrank_ref.nn.linear.linear_backward -->

The gradient of $y = x W^\top$ is

$$\frac{\partial L}{\partial W} = \bar y^\top x .$$

The code is `lowrank_ref/adapters/lora.py`; the checker is `lowrank_ref.gradcheck.gradcheck`;
the notebook `notebooks/01-fake.ipynb` runs it.

## A heading

See [the heading](#a-heading) and [the notebook](../notebooks/01-fake.ipynb).
"""


def _needs_mkdocs():
    try:
        import mkdocs  # noqa: F401
        import mkdocs_jupyter  # noqa: F401
        import websocket  # noqa: F401
    except ImportError as e:
        msg = f"the docs extra is not installed ({e}): make book or pip install -e '.[docs]'"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def chromium():
    exe = check.find_chromium()
    if exe is None:
        msg = "no chromium on PATH (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg + ": CI must run the browser check of the book")
        pytest.skip(msg)
    return exe


def _plot_png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0, 1, 4])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _notebook(with_plot: bool) -> dict:
    code = {"cell_type": "code", "execution_count": 1, "metadata": {}, "source": "plt.plot([0, 1, 2], [0, 1, 4])",
            "outputs": []}
    if with_plot:
        code["outputs"] = [{"output_type": "display_data", "metadata": {},
                            "data": {"image/png": _plot_png(), "text/plain": "<Figure>"}}]
    cells = [
        {"cell_type": "markdown", "metadata": {},
         "source": "# 01 · Fake notebook\n\nThe update is $\\Delta W = s\\,BA$, and back to "
                   "[the chapter](../chapters/01-fake.md).\n\n## A plot"},
        code,
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


PACKAGE_FILES = ("lowrank_ref/adapters/lora.py", "lowrank_ref/nn/linear.py", "lowrank_ref/gradcheck.py")


def fake_repo(tmp_path: Path, chapters: dict[str, str] | None = None, plot: bool = True) -> Path:
    """A checkout with one chapter, its notebook, and the package files the chapter names."""
    root = tmp_path / "repo"
    (root / "chapters").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "README.md").write_text("# Fake book\n\n[Chapter 01](chapters/01-fake.md)\n", encoding="utf-8")
    for name, text in (chapters if chapters is not None else {"01-fake.md": CHAPTER}).items():
        (root / "chapters" / name).write_text(text, encoding="utf-8")
    (root / "notebooks" / "01-fake.ipynb").write_text(json.dumps(_notebook(plot)), encoding="utf-8")
    for rel in PACKAGE_FILES:  # the files the chapter names (the package itself is imported as installed)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(ROOT / rel)
    return root


def _fails(root: Path, *needles: str, out: Path | None = None) -> str:
    with pytest.raises(build.BookError) as info:
        build.build(root, out or root / "site")
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in the error:\n{msg}"
    return msg


# ------------------------------------------------------------------------ table of contents


def test_every_chapter_and_notebook_of_the_repository_is_in_the_table_of_contents():
    book = build.discover(ROOT)
    toc = json.dumps(build.nav(book))
    chapters = sorted(p for p in (ROOT / "chapters").glob("*.md") if p.name != "README.md")
    notebooks = sorted((ROOT / "notebooks").rglob("*.ipynb"))
    assert chapters and notebooks
    for p in chapters + notebooks:
        assert json.dumps(p.relative_to(ROOT).as_posix()) in toc, f"{p} is missing from the book"
    home = "chapters/README.md" if (ROOT / "chapters" / "README.md").is_file() else "README.md"
    assert book.home == home and book.pages[home] == "index.md"


def test_a_chapter_not_named_nn_slug_fails_naming_it(tmp_path):
    root = fake_repo(tmp_path, {"01-fake.md": CHAPTER, "intro.md": "# Intro\n"})
    _fails(root, "chapters/intro.md", "not in the table of contents")


def test_two_chapters_with_one_number_fail(tmp_path):
    root = fake_repo(tmp_path, {"01-fake.md": CHAPTER, "01-other.md": CHAPTER})
    _fails(root, "chapters/01-fake.md", "chapters/01-other.md", "number 01")


def test_the_syllabus_is_the_home_page_and_the_readme_a_page(tmp_path):
    root = fake_repo(tmp_path)
    (root / "chapters" / "README.md").write_text("# Syllabus\n\n[LoRA](01-fake.md)\n", encoding="utf-8")
    book = build.discover(root)
    assert book.pages["chapters/README.md"] == "index.md" and book.pages["README.md"] == "readme.md"
    docs = tmp_path / "docs"
    build.stage(book, docs)
    assert "[LoRA](chapters/01-fake.md)" in (docs / "index.md").read_text()  # the link moved with the page


# ---------------------------------------------------------------------------- links that break


def test_a_link_to_a_missing_page_fails_naming_page_and_link(tmp_path):
    root = fake_repo(tmp_path, {"01-fake.md": CHAPTER + "\nSee [chapter 2](02-gone.md#intro).\n"})
    _fails(root, "chapters/01-fake.md", "(02-gone.md#intro)", "does not exist")
    root = fake_repo(tmp_path / "b", {"01-fake.md": CHAPTER + "\nSee [chapter 2][c2].\n\n[c2]: 02-gone.md\n"})
    _fails(root, "chapters/01-fake.md", "02-gone.md", "does not exist")
    root = fake_repo(tmp_path / "c", {"01-fake.md": CHAPTER + "\n![a figure](figures/gone.png)\n"})
    _fails(root, "chapters/01-fake.md", "(figures/gone.png)", "does not exist")


def test_a_chapter_without_its_derives_line_fails(tmp_path):
    root = fake_repo(tmp_path, {"01-fake.md": CHAPTER.replace("<!-- derives:", "<!-- nothing:")})
    _fails(root, "chapters/01-fake.md", "<!-- derives:")


def test_a_derived_function_the_package_no_longer_has_fails_naming_page_and_name(tmp_path):
    text = CHAPTER.replace("lowrank_ref.adapters.lora.lora_backward", "lowrank_ref.adapters.lora.lora_backwards")
    _fails(fake_repo(tmp_path, {"01-fake.md": text}), "chapters/01-fake.md", "lowrank_ref.adapters.lora.lora_backwards")


def test_a_package_name_in_the_prose_that_no_longer_exists_fails(tmp_path):
    text = CHAPTER + "\nThe old home of it was `lowrank_ref.nn.no_such_layer`.\n"
    _fails(fake_repo(tmp_path, {"01-fake.md": text}), "chapters/01-fake.md", "lowrank_ref.nn.no_such_layer")
    text = CHAPTER + "\nThe file `lowrank_ref/adapters/gone.py` holds it.\n"
    _fails(fake_repo(tmp_path / "b", {"01-fake.md": text}), "chapters/01-fake.md", "lowrank_ref/adapters/gone.py")


def test_derived_functions_link_to_the_line_where_they_are_defined(tmp_path):
    root = fake_repo(tmp_path)
    book = build.discover(root)
    docs = tmp_path / "docs"
    build.stage(book, docs)
    staged = (docs / "chapters" / "01-fake.md").read_text(encoding="utf-8")
    for rel, name in (("lowrank_ref/adapters/lora.py", "lora_backward"), ("lowrank_ref/nn/linear.py", "linear_backward")):
        lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
        want = next(i + 1 for i, line in enumerate(lines) if line.startswith(f"def {name}("))
        assert f"(../source/{rel}.md#L-{want})" in staged, f"{name} should link to {rel} line {want}"
        page = (docs / "source" / f"{rel}.md").read_text(encoding="utf-8")
        assert f'id="L-{want}"' in page
    assert "[`lowrank_ref/adapters/lora.py`](../source/lowrank_ref/adapters/lora.py.md)" in staged
    assert "**Notebook:** [01-fake.ipynb](../notebooks/01-fake.ipynb)" in staged
    assert "[`notebooks/01-fake.ipynb`](../notebooks/01-fake.ipynb)" in staged  # a page, named in the prose
    nb = json.loads((docs / "notebooks" / "01-fake.ipynb").read_text(encoding="utf-8"))
    assert "[the chapter](../chapters/01-fake.html)" in nb["cells"][1]["source"]  # under its title
    assert "[the chapter](../chapters/01-fake.html)" in nb["cells"][0]["source"]  # its own link, rewritten


# --------------------------------------------------------------------- building into the site


def test_a_link_to_a_missing_heading_fails_and_leaves_the_previous_site_as_it_was(tmp_path):
    _needs_mkdocs()
    root = fake_repo(tmp_path, {"01-fake.md": CHAPTER + "\nSee [nowhere](#no-such-heading).\n"})
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("the old site", encoding="utf-8")
    # MkDocs' own check, in strict mode: it fails late, after everything was staged
    _fails(root, "chapters/01-fake.md", "no-such-heading", out=site)
    assert (site / "index.html").read_text(encoding="utf-8") == "the old site"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "site"]  # no build folder left


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    _needs_mkdocs()
    tmp = tmp_path_factory.mktemp("book")
    root = fake_repo(tmp)
    site = tmp / "site"
    site.mkdir()
    (site / "stale.html").write_text("from an earlier build", encoding="utf-8")
    build.build(root, site)
    return site


def test_a_build_replaces_the_site_whole_and_bundles_mathjax(fake_site):
    assert not (fake_site / "stale.html").exists()
    assert (fake_site / "index.html").is_file()
    assert (fake_site / "assets" / "mathjax" / "tex-svg-full.js").stat().st_size > 500_000
    html = "".join(p.read_text(encoding="utf-8") for p in fake_site.rglob("*.html"))
    assert not re.search(r"<script[^>]+src=\"https?:", html), "a page loads a script from the web"
    assert not re.search(r"<link[^>]+href=\"https?:[^\"]*\.css", html), "a page loads a stylesheet from the web"


# ----------------------------------------------------------------------------- in the browser


def test_the_book_in_a_browser_math_plots_links(fake_site, chromium, tmp_path):
    report = check.crawl(fake_site, chromium, tmp_path / "_checks")
    assert report.problems == []
    chapter, nb = report.pages["chapters/01-fake.html"], report.pages["notebooks/01-fake.html"]
    assert chapter.math >= 2 and nb.math >= 1  # inline and display math, in a chapter and in a notebook
    assert nb.notebook and nb.plots == 1
    assert {"home", "chapter", "notebook"} <= set(report.screenshots)
    for label in ("home", "chapter", "notebook"):
        assert (tmp_path / "_checks" / f"{label}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("source/") for n in report.pages)  # the crawl reached the source pages


def test_the_browser_check_catches_planted_faults(fake_site, chromium, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(fake_site, site)
    (site / "assets" / "mathjax" / "tex-svg-full.js").unlink()  # math left as TeX
    index = site / "index.html"
    planted = ('<a href="chapters/02-gone.html">gone</a><a href="chapters/01-fake.html#nowhere">x</a>'
               '<img src="assets/missing.png"><script src="http://127.0.0.2:9/cdn.js"></script>'
               '<script>throw new Error("planted")</script></body>')
    index.write_text(index.read_text(encoding="utf-8").replace("</body>", planted), encoding="utf-8")
    problems = "\n".join(check.crawl(site, chromium).problems)
    for needle in (
        "chapters/01-fake.html: math not typeset",
        "notebooks/01-fake.html: math not typeset",
        "index.html: the link to chapters/02-gone.html is broken",
        "index.html: the link to chapters/01-fake.html#nowhere is broken",
        "index.html: the image http://127.0.0.1",
        "index.html: fetched http://127.0.0.2:9/cdn.js from outside the site",
        "index.html: a script threw: Error: planted",
    ):
        assert needle in problems, f"{needle!r} not reported:\n{problems}"


def test_the_repository_book_builds_and_passes_the_browser_check(chromium, tmp_path):
    _needs_mkdocs()
    site = tmp_path / "site"
    build.build(ROOT, site)
    report = check.crawl(site, chromium, tmp_path / "_checks")
    assert report.problems == []
    for p in sorted((ROOT / "chapters").glob("[0-9][0-9]-*.md")):
        if "$$" in p.read_text(encoding="utf-8"):
            assert report.pages[f"chapters/{p.stem}.html"].math > 0, f"{p.name}: no formula typeset"
    with_plots = [p for p in (ROOT / "notebooks").rglob("*.ipynb")
                  if '"image/png"' in p.read_text(encoding="utf-8")]
    if with_plots:  # notebooks committed with their outputs: their plots show in the book
        for p in with_plots:
            name = p.relative_to(ROOT).with_suffix(".html").as_posix()
            assert report.pages[name].plots > 0, f"{name}: the committed plot did not load"
        assert "notebook" in report.screenshots
    assert {"home", "chapter"} <= set(report.screenshots)
