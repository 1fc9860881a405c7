"""Check the built book in a real browser: headless Chromium, the site served on 127.0.0.1 only.

    python book/check.py                 # checks site/, screenshots into site/_checks/
    python book/check.py --site DIR

It opens every page reachable from the home page (the crawl follows every internal link), and
fails, naming the page, when:

- a link inside the site leads nowhere (a missing file, or a `#fragment` with no such id there);
- math was not typeset: raw TeX (`$$`, `\\(`, `\\frac`, ...) is left in the text a reader sees, or
  MathJax reported an error in a formula;
- an image does not load (a plot in a notebook's output, a figure in a chapter);
- the page asked for anything outside the site (a CDN, a web font): the book works offline;
- a script on the page threw an error.

Screenshots of the home page, a chapter with equations and a notebook with a plot are written to
`<site>/_checks/` for a person to look at, with `report.json` (what was checked, page by page).

The browser is Debian's `chromium` (`apt-get install chromium`); it is driven through the DevTools
protocol over a WebSocket (the `websocket-client` package), so no browser is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# TeX that a typeset page never shows as text: display/inline delimiters and common commands
RAW_TEX_RE = re.compile(
    r"\$\$|\\[()\[\]]"  # $$, \( \) \[ \]
    r"|\\[A-Za-z]{2,}"  # a command: \frac, \top, \Delta (code blocks are not searched)
    r"|(?<![\w$])\$(?=\S)[^$\n]{1,200}(?<=\S)\$(?![\w$])"  # $...$ on one line
)


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CheckError(Exception):
    pass


# ------------------------------------------------------------------------------- the web server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D102 - the crawl reports what matters
        pass


class Server:
    """`site` served on 127.0.0.1 at a free port, in a thread."""

    def __init__(self, site: Path):
        handler = functools.partial(_QuietHandler, directory=str(site))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------ the browser (DevTools protocol)


class Browser:
    """Headless Chromium with one tab, driven over the DevTools protocol."""

    def __init__(self, exe: str, timeout: float = 30.0):
        import websocket  # websocket-client, from the docs extra

        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="book-chromium-")
        args = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
            "--window-size=1280,1000", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self.profile}", "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise CheckError(f"{exe} exited with {self.proc.returncode} before it was ready:\n{err}")
            if time.monotonic() > deadline:
                self.close()
                raise CheckError(f"{exe} did not open its DevTools port within {timeout:.0f} s")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep its pipe drained
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            targets = json.load(r)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise CheckError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise CheckError(f"{method}: no answer within {self.timeout:.0f} s")

    def wait_event(self, method: str, since: int):
        deadline = time.monotonic() + self.timeout
        while True:
            for e in self.events[since:]:
                if e["method"] == method:
                    return e
            if time.monotonic() > deadline:
                raise CheckError(f"no {method} within {self.timeout:.0f} s")
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise CheckError(f"script failed: {res['exceptionDetails'].get('text')} {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str) -> list[dict]:
        """Load `url` and wait until it settled; return the events it caused."""
        since = len(self.events)
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", since)
        self.evaluate(SETTLE_JS)
        self.call("Runtime.evaluate", expression="0")  # flush the events that came in meanwhile
        return self.events[since:]

    def screenshot(self, path: Path, scroll_to: str | None = None) -> None:
        if scroll_to:
            self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(scroll_to)}); "
                          "if (e) e.scrollIntoView({block: 'center'}); return !!e })()")
            self.evaluate("new Promise(r => setTimeout(r, 400))")  # let the header's animation end
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


# what the page has settled into: MathJax has typeset and every image has loaded or failed
SETTLE_JS = """
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await Promise.all([...document.images].map(i => i.complete ? null :
    new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  return true;
})()
"""

# what a page shows and links to
INSPECT_JS = """
(() => {
  const article = document.querySelector('article') || document.body;
  const visible = article.cloneNode(true);
  visible.querySelectorAll('pre, code, script, style, mjx-container, .MathJax, textarea, .highlight')
    .forEach(e => e.remove());
  const text = visible.textContent;
  const toc = [...document.querySelectorAll('.md-nav__link')].map(a => {
    const c = a.cloneNode(true); c.querySelectorAll('mjx-container').forEach(e => e.remove());
    return c.textContent; }).join('\\n');
  return {
    title: document.title,
    text: text,
    toc: toc,
    math: document.querySelectorAll('article mjx-container').length,
    merrors: [...document.querySelectorAll('mjx-merror, [data-mjx-error]')].map(
      e => e.getAttribute('data-mjx-error') || e.textContent).slice(0, 5),
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0,
      plot: !!i.closest('.jp-OutputArea, .jp-RenderedImage, .output_png')})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id).concat(
      [...document.querySelectorAll('a[name]')].map(e => e.name)),
    notebook: !!document.querySelector('.jupyter-wrapper'),
  };
})()
"""


# ----------------------------------------------------------------------------------- the crawl


@dataclass
class Page:
    url: str
    title: str = ""
    math: int = 0
    plots: int = 0
    images: int = 0
    notebook: bool = False
    ids: set[str] = field(default_factory=set)


@dataclass
class Report:
    pages: dict[str, Page] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    screenshots: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "pages": {u: {"title": p.title, "math": p.math, "images": p.images, "plots": p.plots,
                          "notebook": p.notebook} for u, p in self.pages.items()},
            "problems": self.problems,
            "screenshots": self.screenshots,
        }


# Pages opened without the browser: the package source, one page per file, with no math and no
# images; their links and ids are read from the HTML (it is what the browser shows: no script
# writes these pages), which keeps the check within a minute.
PLAIN_PAGES = ("source/",)


class _LinksAndIds(HTMLParser):
    def __init__(self, url: str):
        super().__init__()
        self.url, self.links, self.ids, self.images, self.title = url, [], [], [], ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href") is not None:
            self.links.append(urllib.parse.urljoin(self.url, a["href"]))
        if tag == "a" and a.get("name"):
            self.ids.append(a["name"])
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "img" and a.get("src"):
            self.images.append(urllib.parse.urljoin(self.url, a["src"]))
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        self._in_title = False


def _inspect_plain(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        parser = _LinksAndIds(url)
        parser.feed(r.read().decode("utf-8", errors="replace"))
    images = [{"src": src, "ok": _status(src) == 200, "plot": False} for src in parser.images]
    return {"title": parser.title, "text": "", "toc": "", "math": 0, "merrors": [], "images": images,
            "links": parser.links, "ids": parser.ids, "notebook": False}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def crawl(site: Path, exe: str, checks: Path | None = None, max_pages: int = 2000) -> Report:
    """Open every page of `site` reachable from index.html; return what was found."""
    report = Report()
    with Server(site) as server:
        base = server.base
        browser = Browser(exe)
        try:
            queue, seen = [base + "index.html"], {base + "index.html"}
            links: list[tuple[str, str]] = []  # (from page, to url with fragment)
            while queue:
                url = queue.pop(0)
                name = url[len(base):]
                if len(report.pages) >= max_pages:
                    report.problems.append(f"more than {max_pages} pages: the crawl stopped")
                    break
                if _status(url) != 200:  # reported below, with the pages that link to it
                    continue
                if name.startswith(PLAIN_PAGES):
                    events, info = [], _inspect_plain(url)
                else:
                    events = browser.open(url)
                    info = browser.evaluate(INSPECT_JS)
                page = Page(url, info["title"], info["math"], notebook=info["notebook"], ids=set(info["ids"]))
                report.pages[name] = page
                for e in events:
                    m, p = e["method"], e.get("params", {})
                    if m == "Network.requestWillBeSent":
                        req = p["request"]["url"]
                        if not req.startswith((base, "data:", "blob:", "about:")):
                            report.problems.append(f"{name}: fetched {req} from outside the site")
                    elif m == "Network.responseReceived" and p["response"]["url"].startswith(base):
                        if p["response"]["status"] >= 400:
                            report.problems.append(f"{name}: {p['response']['url'][len(base):]} answered "
                                                   f"{p['response']['status']}")
                    elif m == "Runtime.exceptionThrown":
                        d = p["exceptionDetails"]
                        msg = d.get("exception", {}).get("description") or d.get("text")
                        report.problems.append(f"{name}: a script threw: {msg.splitlines()[0] if msg else d}")
                raw = RAW_TEX_RE.findall(info["text"]) + RAW_TEX_RE.findall(info["toc"])
                if raw:
                    where = RAW_TEX_RE.search(info["text"]) or RAW_TEX_RE.search(info["toc"])
                    src = info["text"] if RAW_TEX_RE.search(info["text"]) else info["toc"]
                    around = src[max(0, where.start() - 40): where.end() + 40].replace("\n", " ")
                    report.problems.append(f"{name}: math not typeset ({len(raw)} raw TeX marks), e.g. ...{around}...")
                for err in info["merrors"]:
                    report.problems.append(f"{name}: MathJax could not typeset a formula: {err}")
                for img in info["images"]:
                    page.images += 1
                    page.plots += img["plot"] and img["ok"]
                    if not img["ok"]:
                        report.problems.append(f"{name}: the image {img['src']} did not load")
                for href in info["links"]:
                    if not href.startswith(base):
                        continue
                    links.append((name, href))
                    target = href.split("#")[0]
                    if target in seen:
                        continue
                    seen.add(target)
                    path = urllib.parse.urlparse(target).path
                    if path.endswith("/") or path.endswith(".html"):
                        queue.append(target)
            for src, href in links:  # every internal link: its file exists and so does its #fragment
                target, _, frag = href.partition("#")
                tname = target[len(base):]
                if tname in report.pages:
                    if frag and urllib.parse.unquote(frag) not in report.pages[tname].ids:
                        report.problems.append(f"{src}: the link to {tname}#{frag} is broken (no such id there)")
                elif tname.endswith(".html") or tname.endswith("/") or tname == "":
                    report.problems.append(f"{src}: the link to {tname} is broken (the page did not load)")
                elif _status(target) != 200:
                    report.problems.append(f"{src}: the link to {tname} is broken ({_status(target)})")
            if checks is not None:
                _screenshots(browser, base, report, checks)
        finally:
            browser.close()
    report.problems = list(dict.fromkeys(report.problems))
    return report


def _screenshots(browser: Browser, base: str, report: Report, checks: Path) -> None:
    checks.mkdir(parents=True, exist_ok=True)
    chapters = [n for n, p in report.pages.items() if n.startswith("chapters/") and p.math]
    plots = [n for n, p in report.pages.items() if p.notebook and p.plots]
    chosen = {"home": ("index.html", None)}
    if chapters:
        chosen["chapter"] = (max(chapters, key=lambda n: report.pages[n].math), "article mjx-container[display]")
    if plots:
        chosen["notebook"] = (plots[0], ".jp-OutputArea img")
    for label, (name, anchor) in chosen.items():
        browser.open(base + name)
        out = checks / f"{label}.png"
        browser.screenshot(out, scroll_to=anchor)
        report.screenshots[label] = name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, default=Path(__file__).resolve().parent.parent / "site")
    ap.add_argument("--require-plot", action="store_true",
                    help="fail unless some notebook page shows a plot (a committed image output)")
    args = ap.parse_args(argv)
    exe = find_chromium()
    if exe is None:
        msg = "no chromium on PATH (apt-get install chromium), so the site was not checked in a browser"
        if os.environ.get("CI"):
            print(f"book check: FAILED: {msg}; CI must run this check", file=sys.stderr)
            return 1
        print(f"book check: skipped: {msg}", file=sys.stderr)
        return 2
    if not (args.site / "index.html").is_file():
        print(f"book check: {args.site}/index.html does not exist: run `make book` first", file=sys.stderr)
        return 1
    checks = args.site / "_checks"
    t0 = time.monotonic()
    report = crawl(args.site, exe, checks)
    if args.require_plot and "notebook" not in report.screenshots:
        report.problems.append("no notebook page shows a plot that loaded")
    (checks / "report.json").write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")
    n = len(report.pages)
    math = sum(p.math for p in report.pages.values())
    plots = sum(p.plots for p in report.pages.values())
    print(f"book check: {n} pages, {math} formulas typeset, {plots} plots loaded, "
          f"{len(report.problems)} problems ({time.monotonic() - t0:.0f} s); screenshots in {checks}/")
    for p in report.problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
