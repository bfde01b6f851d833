"""Real-browser test of the brpg.views widgets: JupyterLab (headless, 127.0.0.1, random port, token) driven
by Playwright with Debian's Chromium. It opens a synthetic-data demo notebook, runs it, moves the feature
view's threshold slider with the keyboard and checks that the kernel re-rendered the figure; then it checks
that the training dashboard, fed by a trainer running in a background thread, updates the page by itself, and
that its Stop button ends a long run; it checks that the figures are crisp on a 2x screen, and follows a `brpg train`
started in a subprocess (no trainer in the kernel) until it finishes.

Skipped (with the reason) only when chromium or playwright is missing, and never under CI=true."""
import io, json, os, secrets, shutil, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "assets" / "views_demo.ipynb"
CHROMIUM = os.environ.get("BRPG_CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
STDERR_SEL = ".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']"


def _missing():
    why = []
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")): why.append(f"chromium not found at {CHROMIUM}")
    try: import playwright.sync_api  # noqa: F401
    except ImportError: why.append("python playwright is not installed")
    return "; ".join(why)


MISSING = _missing()
if MISSING:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser test prerequisites missing under CI: {MISSING}", pytrace=False)
    pytest.skip(f"browser test skipped: {MISSING}", allow_module_level=True)

from PIL import Image as PILImage  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402


@pytest.fixture
def lab(free_port):
    "JupyterLab serving a temp copy of the demo notebook; always terminated."
    root = Path(tempfile.mkdtemp(prefix="brpg_lab_"))
    shutil.copy(ASSET, root / "views_demo.ipynb")
    port, token = free_port, secrets.token_hex(16)
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", JUPYTER_NO_CONFIG="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               JUPYTER_RUNTIME_DIR=str(root / ".runtime"), IPYTHONDIR=str(root / ".ipython"))
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
                            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            if proc.poll() is not None: break
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1); break
            except Exception: time.sleep(0.25)
        if proc.poll() is not None:
            log.flush(); pytest.fail(f"jupyterlab exited early:\n{(root / 'lab.log').read_text()[-3000:]}")
        yield url, token, root
    finally:
        proc.terminate()
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait(timeout=5)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _no_traceback(page):
    errs = [t for t in page.locator(STDERR_SEL).all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not errs, f"error output in the notebook:\n{errs[0][:2000]}"


def _run_cell(page, cell, tries=4):
    "Shift+Enter in `cell` until the kernel takes it (the first request can be lost while the kernel connects)."
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(tries):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function("el => /\\[(\\*|\\d+)\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=10_000)
            return
        except Exception: continue
    raise AssertionError(f"the kernel never ran the cell (prompt {prompt.inner_text()!r})")


def _run_with_status(page, cell, timeout=60_000):
    "Run `cell`; its output area and the first HTML widget in it (a dashboard's status line), once visible."
    _run_cell(page, cell)
    out = cell.locator(".jp-OutputArea")
    status = out.locator(".widget-html-content").first
    status.wait_for(state="visible", timeout=timeout)
    return out, status


def _iteration(status) -> str:
    "The `N` or `N/M` after 'iteration ' in a status line."
    return status.inner_text().split("iteration ")[1].split(",")[0]


def test_views_in_jupyterlab(lab):
    url, token, root = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    headless=True, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100}, device_scale_factor=2)   # a HiDPI screen
            page.set_default_timeout(45_000)
            page.goto(f"{url}/lab/tree/views_demo.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            cells = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell")
            expect(cells).to_have_count(6, timeout=30_000)
            # run the feature-view cell
            _run_cell(page, cells.nth(0))
            out0 = cells.nth(0).locator(".jp-OutputArea")
            img = out0.locator(".widget-image, img").first
            img.wait_for(state="visible", timeout=60_000)
            page.wait_for_function("el => el.naturalWidth > 0", arg=img.element_handle())
            status = out0.locator(".widget-html-content").first
            status.wait_for(state="visible")
            src0, text0 = img.get_attribute("src"), status.inner_text()
            shot0 = img.screenshot()
            _no_traceback(page)
            # crisp on a 2x screen: the PNG has 2 device pixels per CSS pixel, shown at its own CSS size (not stretched)
            nat, css = img.evaluate("el => [el.naturalWidth, el.getBoundingClientRect().width]")
            assert abs(nat - 2 * css) <= 2, (nat, css)
            sw = PILImage.open(io.BytesIO(shot0)).size[0]
            assert abs(sw - 2 * css) <= 4, f"screenshot is {sw} px wide, not 2 x {css} CSS px"
            # move the threshold slider (the first slider of the view) by keyboard: 0.70 -> 0.80
            handle = out0.locator(".widget-slider [role=slider]").first
            handle.focus()
            for _ in range(10): page.keyboard.press("ArrowRight")
            readout = out0.locator(".widget-slider .widget-readout").first
            page.wait_for_function("el => el.textContent.trim() === '0.80' || el.value === '0.80'", arg=readout.element_handle(), timeout=15_000)
            # the kernel redraws: the status text (high/low counts) and the image change
            page.wait_for_function("([el, t]) => el.innerText !== t", arg=[status.element_handle(), text0], timeout=30_000)
            page.wait_for_function("([el, s]) => el.getAttribute('src') !== s && el.naturalWidth > 0",
                                   arg=[img.element_handle(), src0], timeout=30_000)
            time.sleep(0.3)
            shot1 = img.screenshot()
            assert shot1 != shot0, "figure pixels did not change after moving the threshold slider"
            hi0, hi1 = (int(t.split(" high")[0].split()[-1]) for t in (text0, status.inner_text()))
            assert hi1 < hi0, f"raising the threshold should shrink the high-confidence set: {text0!r} -> {status.inner_text()!r}"
            _no_traceback(page)
            # the dashboard: training runs in a kernel thread; the page must update on its own
            out1, dstat = _run_with_status(page, cells.nth(1))
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            page.wait_for_function("el => el.innerText.includes('finished')", arg=dstat.element_handle(), timeout=60_000)
            assert "iteration 150" in dstat.inner_text(), dstat.inner_text()
            curves = out1.locator("img").first
            assert curves.evaluate("el => el.naturalWidth") > 0
            _no_traceback(page)
            # the Stop button of a long run: the click reaches the kernel while fit() runs in its thread
            out2, st2 = _run_with_status(page, cells.nth(2))
            page.wait_for_function("el => /running.*iteration [1-9]/.test(el.innerText)", arg=st2.element_handle(), timeout=30_000)
            out2.locator("button:has-text('Stop')").click()
            page.wait_for_function("el => el.innerText.includes('stopped')", arg=st2.element_handle(), timeout=30_000)
            it = int(_iteration(st2).split("/")[0])
            assert 0 < it < 100_000
            assert out2.locator("button:has-text('Stop')").is_disabled()
            _no_traceback(page)
            # following `brpg train` started in a subprocess: no trainer in the kernel, the page updates by itself
            out3, st3 = _run_with_status(page, cells.nth(3))
            page.wait_for_function("el => /following.*iteration [1-9]/.test(el.innerText)", arg=st3.element_handle(), timeout=120_000)
            seen = {_iteration(st3)}
            page.wait_for_function("el => el.innerText.startsWith('finished')", arg=st3.element_handle(), timeout=240_000)
            seen.add(_iteration(st3))
            assert "24/24" in seen and len(seen) >= 2, seen              # it moved on its own, to the last iteration
            shown = out3.locator(".widget-image:visible")                 # the curves and the feature view (first tab)
            expect(shown).to_have_count(2, timeout=30_000)
            assert all(w > 0 for w in shown.evaluate_all("els => els.map(e => e.naturalWidth)"))
            _no_traceback(page)
            # the interactive (ipympl) feature view: a click on a point reaches the kernel and says what the point is
            _run_cell(page, cells.nth(4))
            out4 = cells.nth(4).locator(".jp-OutputArea")
            canvas = out4.locator(".jupyter-matplotlib-canvas-div canvas").last
            canvas.wait_for(state="visible", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            time.sleep(1.0)
            _run_cell(page, cells.nth(5))
            txt = cells.nth(5).locator(".jp-OutputArea-output").first
            txt.wait_for(state="visible", timeout=30_000)
            where = json.loads(txt.inner_text().strip().splitlines()[-1])
            box = canvas.bounding_box()
            page.mouse.click(box["x"] + where["x"], box["y"] + where["y"])
            readout = out4.locator(".widget-html-content:has-text('confidence')").first
            readout.wait_for(state="visible", timeout=30_000)
            assert f"row {where['row']}" in readout.inner_text(), readout.inner_text()
            # ... and shows the point's image patch (image, prediction, ground truth) below the figure, crisp at 2x
            patch = out4.locator(".widget-image:visible").first
            patch.wait_for(state="visible", timeout=30_000)
            page.wait_for_function("el => el.naturalWidth > 0", arg=patch.element_handle(), timeout=30_000)
            nat, css = patch.evaluate("el => [el.naturalWidth, el.getBoundingClientRect().width]")
            assert abs(nat - 2 * css) <= 2 and css > 300, (nat, css)
            assert abs(PILImage.open(io.BytesIO(patch.screenshot())).size[0] - 2 * css) <= 4
            _no_traceback(page)
        except Exception:
            try:  # diagnostics for a failing run
                page.screenshot(path=str(Path(tempfile.gettempdir()) / "brpg_browser_failure.png"), full_page=True)
                print("notebook text at failure:\n", page.locator(".jp-Notebook").inner_text()[-3000:])
            except Exception: pass
            raise
        finally:
            browser.close()
