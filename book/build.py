"""Build the book: chapters, notebooks, exercises and the package source as one static site.

    python book/build.py                 # -> site/ (what `make book` runs)
    python book/build.py --out DIR       # -> DIR
    python book/build.py --root REPO     # build another checkout (the tests use small fake ones)

Nothing here is listed by hand. The table of contents is made from the files that exist:
`chapters/NN-slug.md` (each with its notebook `notebooks/NN-*.ipynb`, its exercises
`notebooks/NN-*-exercises.ipynb` and their solutions `notebooks/solutions/NN-*.ipynb`), the
syllabus `chapters/README.md` as the home page (README.md when there is none), and one page per
source file of the package. Each chapter names the package functions it derives in one line,

    <!-- derives: lowrank_ref.adapters.lora.lora_forward, lowrank_ref.adapters.lora.lora_backward -->

and the build imports the package to find each one's file and line, so the links follow the code
when it moves. Backticked package paths and dotted names in the prose (`lowrank_ref/io.py`,
`lowrank_ref.inject.inject`) become links the same way.

The build fails, naming the page and the link, on: a chapter file not named NN-slug.md (it would
have no place in the table of contents), a link to a file that does not exist, a link to a heading
that does not exist (MkDocs' own check, run in strict mode), and a name the package no longer has.
It renders the notebooks with their committed outputs and never executes them. It writes into a
temporary folder and only then swaps it for the old site, so a failed build leaves the previous
site as it was. Nothing is fetched: the math renderer (MathJax 3) comes from a PyPI package and is
copied into the site.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent
PACKAGES = {"lowrank_ref": "lowrank_ref", "lowrank_gpu": "gpu"}  # import name -> folder
CHAPTER_RE = re.compile(r"^(\d\d)-[a-z0-9][a-z0-9-]*\.md$")
NOTEBOOK_RE = re.compile(r"^(\d\d)-[a-z0-9][a-z0-9-]*\.ipynb$")
DERIVES_RE = re.compile(r"<!--\s*derives:\s*(.*?)-->", re.S)
# an inline link or image, or an inline code span (whichever starts first)
INLINE_RE = re.compile(
    r"(?P<link>(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"\n]*\")?\))"
    r"|(?P<code>`(?P<code_text>[^`\n]+)`)"
)
REFDEF_RE = re.compile(r"^(?P<head> {0,3}\[[^\]\n]+\]:[ \t]*)(?P<target><[^>\n]+>|\S+)", re.M)  # [id]: target
DOTTED_RE = re.compile(r"^(lowrank_ref|lowrank_gpu)(\.[A-Za-z_][A-Za-z0-9_]*)+(\(\))?$")
PATH_RE = re.compile(r"^(lowrank_ref|gpu)/[A-Za-z0-9_/.-]*$")
MATHJAX_DIST = "django-static-mathjax"  # MathJax 3, packaged on PyPI
MATHJAX_FILE = "mathjax/static/mathjax/es5/tex-svg-full.js"  # one file: TeX in, SVG out, no fonts


class BookError(Exception):
    """A problem in the sources of the book; the message names the page and the link."""


@dataclass
class Chapter:
    number: str
    path: str  # repo-relative, e.g. chapters/01-lora.md
    title: str
    notebooks: list[str] = field(default_factory=list)
    exercises: list[str] = field(default_factory=list)
    solutions: list[str] = field(default_factory=list)


@dataclass
class Book:
    root: Path
    home: str  # repo-relative path of the page that becomes index.md
    chapters: list[Chapter]
    other_notebooks: list[str]
    readme_page: bool  # README.md is a page of its own (when the syllabus is the home page)
    pages: dict[str, str] = field(default_factory=dict)  # repo path -> path in docs/
    sources: set[str] = field(default_factory=set)  # repo-relative .py (and .c) files with a source page
    assets: set[str] = field(default_factory=set)  # other repo files copied in for a link


# ---------------------------------------------------------------- discovery (the table of contents)


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def discover(root: Path) -> Book:
    """Find every page of the book; a chapter-like file that fits nowhere is an error."""
    chapters_dir, nb_dir = root / "chapters", root / "notebooks"
    if not chapters_dir.is_dir():
        raise BookError(f"{root}: no chapters/ folder")
    chapters = []
    for p in sorted(chapters_dir.glob("*.md")):
        if p.name == "README.md":
            continue
        m = CHAPTER_RE.match(p.name)
        if not m:
            raise BookError(
                f"chapters/{p.name}: not in the table of contents: a chapter is named NN-slug.md "
                "(two digits, a dash, lower-case words joined by dashes)"
            )
        rel = f"chapters/{p.name}"
        chapters.append(Chapter(m.group(1), rel, _title(p.read_text(encoding="utf-8"), p.stem)))
    numbers = [c.number for c in chapters]
    for n in sorted({n for n in numbers if numbers.count(n) > 1}):
        clash = [c.path for c in chapters if c.number == n]
        raise BookError(f"{', '.join(clash)}: two chapters with the number {n}")
    by_number = {c.number: c for c in chapters}

    def notebooks_in(folder: Path) -> list[Path]:
        return sorted(folder.glob("*.ipynb")) if folder.is_dir() else []

    other = []
    for p in notebooks_in(nb_dir) + notebooks_in(nb_dir / "solutions"):
        rel = p.relative_to(root).as_posix()
        m = NOTEBOOK_RE.match(p.name)
        chapter = by_number.get(m.group(1)) if m else None
        if chapter is None:
            other.append(rel)
        elif p.parent.name == "solutions":
            chapter.solutions.append(rel)
        elif p.stem.endswith("-exercises"):
            chapter.exercises.append(rel)
        else:
            chapter.notebooks.append(rel)
    syllabus = chapters_dir / "README.md"
    home = "chapters/README.md" if syllabus.is_file() else "README.md"
    if not (root / home).is_file():
        raise BookError(f"{root}: neither chapters/README.md nor README.md exists for the home page")
    book = Book(root, home, chapters, other, readme_page=home != "README.md" and (root / "README.md").is_file())
    book.pages[home] = "index.md"
    if book.readme_page:
        book.pages["README.md"] = "readme.md"
    for c in chapters:
        book.pages[c.path] = c.path
        for nb in c.notebooks + c.exercises + c.solutions:
            book.pages[nb] = nb
    for nb in other:
        book.pages[nb] = nb
    for folder in PACKAGES.values():
        found = [q for pat in SOURCE_SUFFIXES for q in (root / folder).rglob(f"*{pat}")] if (root / folder).is_dir() else []
        for p in sorted(found):
            if "__pycache__" not in p.parts:
                book.sources.add(p.relative_to(root).as_posix())
    return book


def nav(book: Book) -> list:
    """The table of contents, and the check that every chapter and notebook is in it."""
    items: list = [{"Home": "index.md"}]
    for c in book.chapters:
        short = c.title.split(":")[0].strip() or c.path
        section = [{f"Chapter {c.number}": c.path}]
        for label, files in (("Notebook", c.notebooks), ("Exercises", c.exercises), ("Solutions", c.solutions)):
            section += [{f"{label} {c.number}" if len(files) == 1 else Path(nb).stem: nb} for nb in files]
        items.append({short: section})
    if book.other_notebooks:
        items.append({"Other notebooks": [{Path(nb).stem: nb} for nb in book.other_notebooks]})
    items.append({"Package source": "source/index.md"})
    if book.readme_page:
        items.append({"README": "readme.md"})
    listed = set()

    def walk(entries):
        for e in entries:
            for v in e.values():
                walk(v) if isinstance(v, list) else listed.add(v)

    walk(items)
    missing = [repo for repo, docs in book.pages.items() if docs not in listed]
    if missing:
        raise BookError(f"not in the table of contents: {', '.join(missing)}")
    return items


# ------------------------------------------------------------------ the package: names -> file, line


def resolve(name: str, root: Path) -> tuple[str, int]:
    """`lowrank_ref.adapters.lora.lora_backward` -> ("lowrank_ref/adapters/lora.py", first line)."""
    dotted = name.removesuffix("()")
    parts = dotted.split(".")
    obj = None
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name is not None and modname.startswith(e.name) and e.name.split(".")[0] in PACKAGES:
                continue  # not a module: an attribute of a shorter prefix
            raise BookError(f"cannot import {modname} to find {name}: {e}") from e
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise BookError(f"the package has no {name} ({modname} has no {'.'.join(parts[i:])})") from None
        break
    if obj is None:
        raise BookError(f"the package has no {name}")
    obj = inspect.unwrap(obj)
    if isinstance(obj, property):
        obj = obj.fget
    try:
        file = inspect.getsourcefile(obj)
        line = 1 if inspect.ismodule(obj) else inspect.getsourcelines(obj)[1]
    except TypeError:
        raise BookError(f"{name} is not a function, class or module (it has no source file)") from None
    top = importlib.import_module(parts[0])
    # the path inside the repository: the package folder plus the file's place in the package
    rel_path = posixpath.join(
        PACKAGES[parts[0]], Path(os.path.relpath(file, os.path.dirname(top.__file__))).as_posix()
    )
    if rel_path.startswith(PACKAGES[parts[0]] + "/.."):
        raise BookError(f"{name} is defined in {file}, outside the package")
    here = root / rel_path
    lines = here.read_text(encoding="utf-8").splitlines() if here.is_file() else []
    if inspect.ismodule(obj):
        want = None
    else:
        want = inspect.getsourcelines(obj)[0][0].rstrip("\n")
    if not lines or (want is not None and (len(lines) < line or lines[line - 1] != want)):
        raise BookError(
            f"{name}: the imported package ({file}) is not this checkout's {rel_path}: "
            "install it from here (`make book` does)"
        )
    return rel_path, line


# -------------------------------------------------------------------------------- link rewriting


def _split_fences(text: str):
    """Yield (is_code, chunk): fenced code blocks are left alone."""
    chunk, fence = [], None
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        marker = stripped[:3]
        if fence is None and marker in ("```", "~~~"):
            if chunk:
                yield False, "".join(chunk)
            chunk, fence = [line], marker
        elif fence is not None and stripped.startswith(fence):
            chunk.append(line)
            yield True, "".join(chunk)
            chunk, fence = [], None
        else:
            chunk.append(line)
    if chunk:
        yield fence is not None, "".join(chunk)


SOURCE_SUFFIXES = (".py", ".c")  # the package's source files (the C one: the CPU dequantisation kernel)


def source_page(rel: str) -> str:
    return f"source/{rel}.md"


class Linker:
    """Rewrites one page's links from repository paths to book paths, and checks them."""

    def __init__(self, book: Book, repo_page: str, html: bool = False):
        self.book, self.repo_page, self.html = book, repo_page, html
        self.docs_page = book.pages.get(repo_page, repo_page)

    def _rel(self, docs_target: str, frag: str = "") -> str:
        if self.html:  # notebooks: MkDocs does not rewrite their links, so give the final URL
            stem, ext = posixpath.splitext(docs_target)
            if ext in (".md", ".ipynb"):
                docs_target = stem + ".html"
        start = posixpath.dirname(self.docs_page) or "."
        return posixpath.relpath(docs_target, start) + (f"#{frag}" if frag else "")

    def target(self, target: str, what: str) -> str:
        """A link's new target; `what` is the link as written, for the error message."""
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return target  # a URL, an anchor on this page, or a site-absolute path: left alone
        path, _, frag = target.partition("#")
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(self.repo_page), path))
        full = self.book.root / repo
        if repo.startswith("../") or repo == "..":
            raise BookError(f"{self.repo_page}: the link {what} points outside the repository")
        if repo in self.book.pages:
            return self._rel(self.book.pages[repo], frag)
        if repo.endswith(SOURCE_SUFFIXES) and full.is_file():
            self.book.sources.add(repo)
            return self._rel(source_page(repo), frag)
        if full.is_dir() and any(repo == f or repo.startswith(f + "/") for f in PACKAGES.values()):
            return self._rel("source/index.md", repo.replace("/", "-").replace("_", "-"))
        if full.is_file():
            if full.suffix in (".md", ".ipynb"):
                raise BookError(
                    f"{self.repo_page}: the link {what} points to {repo}, a page that is not in the book"
                )
            self.book.assets.add(repo)
            return self._rel(repo, frag)
        if full.is_dir():
            raise BookError(f"{self.repo_page}: the link {what} points to the folder {repo}, which a book cannot show")
        raise BookError(f"{self.repo_page}: the link {what} points to {repo}, which does not exist")

    def code_ref(self, code: str) -> str | None:
        """A backticked package path or dotted name -> a link into the source pages (or None)."""
        if DOTTED_RE.match(code):
            try:
                rel, line = resolve(code, self.book.root)
            except BookError as e:
                raise BookError(f"{self.repo_page}: `{code}`: {e}") from None
            self.book.sources.add(rel)
            return self._rel(source_page(rel), f"L-{line}")
        if code in self.book.pages:  # `notebooks/01-lora.ipynb`: a page of the book
            return self._rel(self.book.pages[code])
        if PATH_RE.match(code) and not code.startswith("lowrank_ref/assets"):
            path = code.rstrip("/")
            full = self.book.root / path
            if full.is_file() and full.suffix in SOURCE_SUFFIXES:
                self.book.sources.add(path)
                return self._rel(source_page(path))
            if full.is_dir():
                return self._rel("source/index.md", path.replace("/", "-").replace("_", "-"))
            raise BookError(f"{self.repo_page}: `{code}` names a file of the package that does not exist")
        return None

    def markdown(self, text: str) -> str:
        out = []
        for is_code, chunk in _split_fences(text):
            if not is_code:
                chunk = REFDEF_RE.sub(self._refdef, INLINE_RE.sub(self._inline, chunk))
            out.append(chunk)
        return "".join(out)

    def _refdef(self, m: re.Match) -> str:
        target = m.group("target").strip("<>")
        return m.group("head") + self.target(target, f"[...]: {target}")

    def _inline(self, m: re.Match) -> str:
        if m.group("link"):
            new = self.target(m.group("target"), f"({m.group('target')})")
            return f"{m.group('bang')}[{m.group('text')}]({new}{m.group('title') or ''})"
        code = m.group("code_text").strip()
        link = self.code_ref(code)
        return f"[{m.group('code')}]({link})" if link else m.group("code")


# ------------------------------------------------------------------------------------- the pages


def chapter_box(book: Book, c: Chapter, text: str, linker: Linker) -> str:
    """The 'in code' box under a chapter's title: notebook, exercises, and what it derives."""
    m = DERIVES_RE.search(text)
    if not m:
        raise BookError(
            f"{c.path}: names no package functions: add a line "
            "'<!-- derives: lowrank_ref.module.function, ... -->' listing the functions it derives"
        )
    names = [n for n in re.split(r"[\s,]+", m.group(1).strip()) if n]
    if not names:
        raise BookError(f"{c.path}: the derives line names nothing")
    rows = []
    for name in names:
        if not DOTTED_RE.match(name):
            raise BookError(f"{c.path}: derives {name!r}, which is not a lowrank_ref or lowrank_gpu name")
        try:
            rel, line = resolve(name, book.root)
        except BookError as e:
            raise BookError(f"{c.path}: derives {name}: {e}") from None
        book.sources.add(rel)
        short = name.removesuffix("()").rsplit(".", 1)[-1]
        rows.append(f"    - [`{short}`]({linker._rel(source_page(rel), f'L-{line}')}) — `{rel}`, line {line}")
    links = []
    for label, files in (("Notebook", c.notebooks), ("Exercises", c.exercises), ("Solutions", c.solutions)):
        for nb in files:
            links.append(f"**{label}:** [{Path(nb).name}]({linker._rel(nb)})")
    lines = ['!!! abstract "This chapter in code"', ""]
    if links:
        lines += ["    " + " · ".join(links), ""]
    lines += ["    Derived here, in the package (file and line, read from the package when the book was built):", ""]
    lines += rows
    return "\n".join(lines) + "\n"


def insert_after_title(text: str, block: str) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("# "):
            return "".join(lines[: i + 1]) + "\n" + block + "\n" + "".join(lines[i + 1 :])
    return block + "\n" + text


def notebook(book: Book, rel: str) -> str:
    """The notebook as committed, its markdown cells' links rewritten to the book's pages, and a
    line under its title that links back to its chapter."""
    nb = json.loads((book.root / rel).read_text(encoding="utf-8"))
    linker = Linker(book, rel, html=True)
    cells = nb.get("cells", [])
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            src = cell["source"]
            text = "".join(src) if isinstance(src, list) else src
            cell["source"] = linker.markdown(text)
    chapter = next((c for c in book.chapters if rel in c.notebooks + c.exercises + c.solutions), None)
    if chapter is not None:
        links = [f"[the chapter]({linker._rel(chapter.path)})"]
        links += [f"[{label}]({linker._rel(nb_)})" for label, files in
                  (("the notebook", chapter.notebooks), ("the exercises", chapter.exercises),
                   ("the solutions", chapter.solutions)) for nb_ in files if nb_ != rel]
        note = {"cell_type": "markdown", "metadata": {}, "source": f"*{chapter.title}*: " + " · ".join(links)}
        first = cells[0] if cells else {}
        titled = first.get("cell_type") == "markdown" and str(first.get("source", "")).lstrip().startswith("#")
        cells.insert(1 if titled else 0, note)
    return json.dumps(nb, ensure_ascii=False, indent=1)


def source_pages(book: Book) -> dict[str, str]:
    """One page per source file, highlighted, every line with an anchor #L-<n>."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import CLexer, PythonLexer

    fmt = HtmlFormatter(cssclass="highlight", linenos="inline", lineanchors="L", anchorlinenos=True, wrapcode=True)
    pages = {}
    for rel in sorted(book.sources):
        code = (book.root / rel).read_text(encoding="utf-8")
        html = highlight(code, CLexer() if rel.endswith(".c") else PythonLexer(), fmt)
        pages[source_page(rel)] = f"# `{rel}`\n\n<div class=\"book-source\">\n{html}\n</div>\n"
    groups: dict[str, list[str]] = {}
    for rel in sorted(book.sources):
        groups.setdefault(posixpath.dirname(rel), []).append(rel)
    index = ["# The package source", "",
             "Every source file of `lowrank_ref` (the NumPy reference) and `lowrank_gpu` (the PyTorch "
             "mirror, in `gpu/`), as the book was built. Each line has an anchor (`#L-12`); the chapters "
             "link to the line where each function they derive begins.", ""]
    for folder in sorted(groups):
        index += [f"## `{folder}/` {{ #{folder.replace('/', '-').replace('_', '-')} }}", ""]
        index += [f"- [`{posixpath.basename(r)}`]({posixpath.relpath(source_page(r), 'source')})" for r in groups[folder]]
        index.append("")
    pages["source/index.md"] = "\n".join(index)
    return pages


def stage(book: Book, docs: Path) -> None:
    """Write the docs folder MkDocs builds from."""
    written: dict[str, str] = {}
    for repo, docs_path in book.pages.items():
        if repo.endswith(".ipynb"):
            written[docs_path] = notebook(book, repo)
            continue
        text = (book.root / repo).read_text(encoding="utf-8")
        linker = Linker(book, repo)
        body = linker.markdown(text)
        chapter = next((c for c in book.chapters if c.path == repo), None)
        if chapter is not None:
            body = insert_after_title(body, chapter_box(book, chapter, text, linker))
        written[docs_path] = body
    written.update(source_pages(book))  # after the pages: they add the files they link to
    for path, text in written.items():
        (docs / path).parent.mkdir(parents=True, exist_ok=True)
        (docs / path).write_text(text, encoding="utf-8")
    for folder in ("chapters/figures",):  # whole folders a chapter's figures live in
        if (book.root / folder).is_dir():
            shutil.copytree(book.root / folder, docs / folder, dirs_exist_ok=True)
    for rel in book.assets:
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(book.root / rel, docs / rel)
    shutil.copytree(HERE / "assets", docs / "assets", dirs_exist_ok=True)
    try:
        mathjax = Path(str(importlib.metadata.distribution(MATHJAX_DIST).locate_file(MATHJAX_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise BookError(f"{MATHJAX_DIST} is not installed: run `make book` (it installs the docs extra)") from None
    (docs / "assets" / "mathjax").mkdir(parents=True, exist_ok=True)
    shutil.copy2(mathjax, docs / "assets" / "mathjax" / "tex-svg-full.js")


def config(book: Book, docs: Path, site: Path) -> str:
    """book/mkdocs.yml with the folders and the table of contents (JSON values are YAML too)."""
    base = (HERE / "mkdocs.yml").read_text(encoding="utf-8")
    extra = {"docs_dir": str(docs), "site_dir": str(site), "nav": nav(book), "hooks": [str(HERE / "hooks.py")]}
    return base + "\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in extra.items())


# ------------------------------------------------------------------------------------- the build


def build(root: Path, out: Path) -> None:
    """Build the book of the checkout `root` into `out`, replacing it only when the build succeeded."""
    root, out = root.resolve(), out.resolve()
    book = discover(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".book-build-", dir=out.parent))
    try:
        docs, site = work / "docs", work / "site"
        docs.mkdir()
        stage(book, docs)
        cfg_path = work / "mkdocs.yml"
        cfg_path.write_text(config(book, docs, site), encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(cfg_path)],
            cwd=work, capture_output=True, text=True,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"},
        )
        if proc.returncode != 0:
            problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("WARNING", "ERROR"))]
            detail = "\n".join(problems) or (proc.stdout + proc.stderr)[-3000:]
            raise BookError(f"mkdocs build --strict failed (paths are the book's, as in the repository):\n{detail}")
        (site / ".nojekyll").touch()
        old = work / "old"
        if out.exists():
            out.rename(old)
        site.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the repository to build (default: this one)")
    ap.add_argument("--out", type=Path, default=None, help="where the site goes (default: ROOT/site)")
    args = ap.parse_args(argv)
    out = args.out or args.root / "site"
    sys.path.insert(0, str(args.root.resolve()))
    try:
        build(args.root, out)
    except BookError as e:
        print(f"book: {e}", file=sys.stderr)
        return 1
    print(f"book: built {out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
