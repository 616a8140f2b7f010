"""The rendered book, opened in headless Chromium: pages load without console errors, figures are
present, math is typeset by the MathJax the build serves itself, and internal links resolve."""

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest
from book import QUICK_BOOK, chapters, toc_files
from bs4 import BeautifulSoup

pytestmark = pytest.mark.notebooks

HTML = Path(os.environ.get("BOOK_HTML", QUICK_BOOK / "_build" / "html"))
PAGES = [f"{f}.html" for f in toc_files()]
CHAPTER_PAGES = [f"{c.with_suffix('')}.html" for c in chapters()]


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").is_file():
        pytest.fail(f"no rendered book at {HTML}: run `make html` first", pytrace=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a, **k: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail("chromium/chromedriver not found: run tools/ensure_chromium.sh", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def load(browser, url):
    browser.get(url)
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const wait = () => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
        "  ? MathJax.startup.promise.then(() => done(true)) : done(false);"
        "if (document.readyState === 'complete') wait(); else window.addEventListener('load', wait);"
    )
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_without_console_errors(server, browser, page):
    errors = load(browser, f"{server}/{page}")
    assert not errors, f"{page}: console errors {errors}"
    assert browser.execute_script("return document.querySelector('main h1') !== null"), f"{page}: no title"


@pytest.mark.parametrize("page", CHAPTER_PAGES)
def test_chapter_figures_are_present(server, browser, page):
    load(browser, f"{server}/{page}")
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('main img')).map(i => [i.src, i.naturalWidth]);"
    )
    assert sizes, f"{page} has no figure"
    broken = [src for src, width in sizes if width == 0]
    assert not broken, f"{page}: images that did not load: {broken}"


@pytest.mark.parametrize("page", CHAPTER_PAGES)
def test_math_is_typeset_offline(server, browser, page):
    load(browser, f"{server}/{page}")
    scripts = browser.execute_script(
        "return Array.from(document.scripts).map(s => s.src).filter(s => s.includes('mathjax'));"
    )
    assert scripts and all(s.startswith(server) for s in scripts), f"MathJax not served locally: {scripts}"
    n_math = browser.execute_script("return document.querySelectorAll('mjx-container').length;")
    n_errors = browser.execute_script("return document.querySelectorAll('mjx-merror').length;")
    assert n_math > 0, f"{page}: no typeset math"
    assert n_errors == 0, f"{page}: {n_errors} MathJax errors"


def test_internal_links_resolve():
    ids = {}
    broken = []
    for html in HTML.rglob("*.html"):
        ids[html] = {t["id"] for t in BeautifulSoup(html.read_text(), "html.parser").select("[id]")}
    for page in PAGES:
        path = HTML / page
        soup = BeautifulSoup(path.read_text(), "html.parser")
        for a in soup.select("main a[href]"):
            href = a["href"]
            if urlparse(href).scheme or href.startswith(("mailto:", "//")):
                continue
            target, frag = urldefrag(href)
            dest = (path.parent / unquote(target)).resolve() if target else path
            if not dest.exists():
                broken.append(f"{page}: {href} (no file)")
            elif frag and dest.suffix == ".html" and frag not in ids.get(dest, set()):
                broken.append(f"{page}: {href} (no anchor #{frag})")
    assert not broken, "broken internal links:\n" + "\n".join(broken)
