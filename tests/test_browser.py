"""The explorer in a real browser: the app started with `make app`'s command on a free port, Debian's chromium
driven by playwright. Every page is opened and screenshotted, a prompt holding markup is read on the Prompts page
(its tokens highlighted, the markup shown as text), and a feature is opened from the Hierarchy page. Every step
also reads the server's log and fails on a traceback, an exception or a warning there.

Screenshots (full page), the server's log and, on a failure, a screenshot of the failing state go to
test-artifacts/browser/. `make test` installs chromium where it can (apt, as root); without /usr/bin/chromium or
the playwright package this test is skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
# Flags this machine's chromium needs: as root no sandbox; no GPU; and no background connections, which the closed
# network refuses (many at a time) and which slow every start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions"]
VIEWPORT = {"width": 1400, "height": 900}
SERVER_START_S = 120
PAGE_S = 180  # a page's first run may load the feature store, the SAE, or prepare the model (≈15 s once)
PROMPT = "Tags like <b>x</b> are markup, not bold text. The cat sat on the mat."

# URL path, the page's title (its st.title), file name of its screenshot.
PAGES = [
    ("", "msae: Matryoshka SAE explorer", "0_home"),
    ("Features", "Features", "1_features"),
    ("Hierarchy", "Hierarchy", "2_hierarchy"),
    ("Diagnostics", "Diagnostics", "3_diagnostics"),
    ("Compare", "Compare", "4_compare"),
    ("Prompts", "Prompts", "5_prompts"),
    ("Train", "Train", "6_train"),
    ("Gallery", "Gallery", "7_gallery"),
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return (f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`, which `make test` "
                f"does when run as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"the playwright package is missing ({exc}): `pip install -e '.[dev]'`"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`streamlit run app.py` in the background, its output in a log file."""

    def __init__(self, log: Path, env: dict):
        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.log = log
        self._out = open(log, "w")
        # make app's command: streamlit run app.py --server.port PORT --server.headless true
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode} before answering\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the app did not answer on {self.url} within {timeout:.0f} s\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        self._out.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return (f"--- last {min(n, len(lines))} lines of the server log (all of it in {ARTIFACTS / 'server.log'}) "
                f"---\n" + "\n".join(lines[-n:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture(scope="module")
def server():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="msae-browser-") as tmp:
        env = dict(os.environ, MSAE_WRITE_DIR=str(Path(tmp) / "written"), OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", "2"), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
        # The log is written outside the app's folder: Streamlit watches that folder, and a log inside it would
        # feed the watcher its own events. It is copied to the artifacts at the end.
        srv = Server(Path(tmp) / "server.log", env)
        try:
            srv.wait_healthy()
            yield srv
        finally:
            srv.stop()
            shutil.copy(srv.log, ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server, request):
    """A fresh browser context (a new Streamlit session) per test; its console errors are collected."""
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(PAGE_S * 1000)
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(f"page error: {e}"))
    yield pg
    context.close()


LOG_PROBLEM = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*(?:Error|Exception|Warning|Invalid)\b|"
                         r"\b(?:WARNING|ERROR|CRITICAL)\b")
"""A line of the server's log that says something went wrong: a traceback, an exception or warning class named
(ArrowInvalid among them), or a log record at warning level or above."""


def server_log_problems(server) -> list[str]:
    """The lines of the server's log so far that report a problem."""
    server._out.flush()
    lines = server.log.read_text(errors="replace").splitlines()
    return [line for line in lines if LOG_PROBLEM.search(line)]


@contextlib.contextmanager
def step(page, server, name: str):
    """Run one step; on a failure, save a screenshot of the page as it is and add the server's log to the error.
    A step also fails when the server has logged a traceback, an exception or a warning by its end: Streamlit
    shows some failures (a table Arrow cannot convert) only there."""
    try:
        yield
        problems = server_log_problems(server)
        assert not problems, f"the server logged {len(problems)} problem lines, the first: {problems[:5]}"
    except Exception as exc:
        shot = ARTIFACTS / f"FAILED-{name}.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(shot), full_page=True)
        raise AssertionError(f"step {name!r} failed at {page.url}: {exc}\nscreenshot: {shot}\n"
                             f"browser console errors: {page.console_errors[-10:]}\n{server.tail()}") from exc


def wait_idle(page, timeout_s: float = PAGE_S) -> None:
    """Until the script has finished its run and every element has rendered (no skeletons, spinners, charts
    still drawing)."""
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            if (!app || app.dataset.testConnectionState !== 'CONNECTED') return false;
            if (app.dataset.testScriptState !== 'notRunning') return false;
            if (document.querySelector('[data-testid="stSkeleton"], [data-testid="stSpinner"]')) return false;
            for (const chart of document.querySelectorAll('[data-testid="stPlotlyChart"]'))
                if (!chart.querySelector('.main-svg')) return false;
            return true;
        }""", timeout=timeout_s * 1000, polling=200)


def open_page(page, server, path: str, title: str) -> None:
    page.goto(f"{server.url}/{path}")
    page.get_by_role("heading", name=title, exact=True).first.wait_for()
    wait_idle(page)


def assert_no_errors(page, where: str) -> None:
    """No exception box and no error message on the page."""
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{where}: exception shown: {exceptions.first.inner_text()[:2000]}"
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, f"{where}: error shown: {errors.first.inner_text()[:1000]}"


def screenshot(page, name: str) -> Path:
    """A full-page screenshot. Streamlit scrolls inside its own containers, not the document, so the viewport is
    made as tall as the content first."""
    height = page.evaluate(
        """() => Math.max(...['[data-testid="stMain"]', '[data-testid="stMainBlockContainer"]',
                              '[data-testid="stAppViewContainer"]', '[data-testid="stSidebarContent"]']
            .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight),
            document.documentElement.scrollHeight)""")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": int(min(max(height + 40, VIEWPORT["height"]), 16000))})
    page.wait_for_timeout(300)  # let plotly relayout to the new size
    wait_idle(page)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    return path


@pytest.mark.parametrize("path, title, name", PAGES, ids=[p[2] for p in PAGES])
def test_every_page_opens_by_its_url_without_an_error(page, server, path, title, name):
    """Each page opens by its URL path, runs to the end without an error, and is screenshotted."""
    with step(page, server, name):
        start = time.monotonic()
        open_page(page, server, path, title)
        assert_no_errors(page, title)
        screenshot(page, name)
        print(f"{title}: rendered in {time.monotonic() - start:.1f} s")


def test_prompt_markup_shows_as_text(page, server):
    """A prompt with <b>x</b> in it: its tokens are highlighted, and the markup is shown as text, not as bold."""
    with step(page, server, "prompts-markup"):
        open_page(page, server, "Prompts", "Prompts")
        box = page.get_by_label("prompt", exact=True)
        box.fill(PROMPT)
        box.press("Control+Enter")  # a text area commits its value on Ctrl+Enter
        tokens = page.locator(".msae-tokens")
        # The token row shows the new prompt (the default one holds <b>Bold</b>, not <b>x</b>).
        page.wait_for_function(
            """() => [...document.querySelectorAll('.msae-tokens')].some(d => d.textContent.includes('<b>x</b>'))""",
            timeout=PAGE_S * 1000)
        wait_idle(page)
        assert_no_errors(page, "Prompts")
        row = tokens.first
        text = row.text_content()
        assert "<b>x</b>" in text, f"the markup is not shown as text: {text!r}"
        assert "cat sat on the mat" in text.replace("␣", " "), text
        assert row.locator("b").count() == 0, f"the prompt's <b> became an element: {row.inner_html()[:500]}"
        assert page.locator("b:text-is('x')").count() == 0, "a bold 'x' is on the page"
        active = row.locator(".msae-tok.msae-active")
        assert active.count() > 0, "no token is highlighted"
        shaded = active.first.evaluate("e => getComputedStyle(e).backgroundColor")
        assert shaded not in ("", "transparent", "rgba(0, 0, 0, 0)"), f"a highlighted token has no colour: {shaded}"
        # The tokens reach the heatmap too (its y labels are the latents, its x labels the tokens).
        assert page.locator('[data-testid="stPlotlyChart"] .main-svg').count() > 0, "no heatmap"
        screenshot(page, "5_prompts_markup")


def test_open_feature_from_hierarchy(page, server):
    """On Hierarchy, click a node of the tree figure, then a node of its subtree's node-link figure (real plotly
    clicks, which AppTest cannot make), and open the selected latent: the Features page shows it."""
    with step(page, server, "hierarchy-open"):
        open_page(page, server, "Hierarchy", "Hierarchy")
        before = current_node(page)
        # 1. The icicle: a node with a subtree small enough for the node-link view and tall enough to click. The
        #    figure can be taller than the window: the node is scrolled to the middle of it (clear of Streamlit's
        #    header) and clicked where the browser finds that node on top.
        slices = page.evaluate(f"""() => [...document.querySelectorAll('[data-testid="stPlotlyChart"] g.slice')]
            .map((el, i) => {{ const d = el.__data__, r = el.getBoundingClientRect();
                              return {{i, id: d && d.data && d.data.data ? d.data.data.id : null,
                                       n: d && d.descendants ? d.descendants().length : 0, h: r.height}}; }})
            .filter(s => s.id && /^L\\d+$/.test(s.id) && s.id !== 'L{before}' && s.n >= 2 && s.n <= 150
                         && s.h >= 6)""")
        assert slices, "no node of the tree figure to click (none with a small subtree)"
        target = int(slices[0]["id"][1:])
        at = page.evaluate("""i => { const el = document.querySelectorAll('[data-testid="stPlotlyChart"] g.slice')[i];
            el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();
            const x = r.x + r.width / 2, y = r.y + r.height / 2;
            return {x, y, on_top: el.contains(document.elementFromPoint(x, y))}; }""", slices[0]["i"])
        assert at["on_top"], f"#{target}'s slice is covered where it would be clicked"
        page.mouse.click(at["x"], at["y"])
        wait_selected(page, target)
        print(f"Hierarchy: clicked #{target} in the tree figure ({slices[0]['n'] - 1} below it)")
        # 2. The node-link view of its subtree: click another node.
        page.get_by_text("Link width is the link score").wait_for()
        points = page.locator('[data-testid="stPlotlyChart"]').last.locator(".scatterlayer .trace").last.locator(
            "path.point")
        ids = [points.nth(i).evaluate("e => e.__data__.data") for i in range(points.count())]
        assert target in ids and len(ids) >= 2, f"the subtree figure shows {ids}, not #{target} and its children"
        pick = next(i for i, latent in enumerate(ids) if latent != target)
        points.nth(pick).click(force=True)
        chosen = ids[pick]
        wait_selected(page, chosen)
        print(f"Hierarchy: clicked #{chosen} in the subtree figure")
        page.mouse.move(0, 0)  # no hover label in the screenshot
        screenshot(page, "2_hierarchy_selected")
        page.get_by_role("button", name=f"Open #{chosen} in Features").click()
        page.wait_for_url(re.compile(rf"/Features\?(.*&)?latent={chosen}(&|$)"))
        page.get_by_role("heading", name="Features", exact=True).wait_for()
        wait_idle(page)
        assert_no_errors(page, "Features, opened from Hierarchy")
        header = page.locator("h2").first.inner_text()
        assert header.startswith(f"#{chosen}"), f"Features shows {header!r}, not latent #{chosen}"
        screenshot(page, "1_features_from_hierarchy")


def current_node(page) -> int:
    """The node the Hierarchy page has selected, read off its "Open #N in Features" button."""
    label = page.get_by_role("button", name=re.compile(r"Open #\d+ in Features")).inner_text()
    return int(re.search(r"#(\d+)", label).group(1))


def wait_selected(page, latent: int) -> None:
    """Until the Hierarchy page has `latent` selected (its button names it) and has finished its run."""
    page.get_by_role("button", name=f"Open #{latent} in Features").wait_for(timeout=60_000)
    wait_idle(page)


def test_gallery_shows_its_cases(page, server):
    """The Gallery page on the shipped runs: each case's heatmap drawn (or, where the shipped runs hold no
    gallery, the line that says how to make one)."""
    shipped = REPO / "assets" / "default" / "matryoshka" / "gallery.json"
    with step(page, server, "gallery"):
        open_page(page, server, "Gallery", "Gallery")
        assert_no_errors(page, "Gallery")
        if not shipped.exists():
            assert page.get_by_text("No gallery for this run yet").count() == 1
            return
        import json

        cases = json.loads(shipped.read_text())["cases"]
        charts = page.locator('[data-testid="stPlotlyChart"] .main-svg')
        page.wait_for_function(f"""() => document.querySelectorAll('[data-testid="stPlotlyChart"] .main-svg').length
                                          >= {len(cases)}""", timeout=PAGE_S * 1000)
        assert charts.count() >= len(cases)
        screenshot(page, "7_gallery_cases")
