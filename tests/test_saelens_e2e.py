"""A SAELens user's SAE, end to end: a small Matryoshka BatchTopK SAE trained by SAELens's own runner in the interop
side environment (the built-in model's folder through AutoModelForCausalLM, hook model.layers.3, a local folder of
jsonl text, 300 steps of 64 tokens), then `msae analyze FOLDER` with no flag beyond the folder (it reads the
model, layer, context size and dataset SAELens recorded), then the run opened on Features and Hierarchy in the real
browser, whose server log stays clean. About 8 minutes on 2 busy cores. Skipped, saying why, where the side
environment, the built-in model or the browser cannot be had."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msae.analysis.store import load_store
from msae.lm import LMLoadError, builtin_model_dir
from msae.run import Run
from test_browser import (ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, PAGE_S, VIEWPORT, Server, _missing, assert_no_errors,
                          screenshot, step, wait_idle)
from test_interop import run_peer, side_python  # noqa: F401 (side_python is a fixture)
from test_saelens_dataset import jsonl_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
PROJECT = "my-sae-project"
"""The folder the SAELens user trains from: the dataset inside it, the runner's output/ and checkpoints/ beside."""
LAYER, WIDTHS, K = 3, [32, 128, 256], 8


@pytest.fixture(scope="module")
def project(side_python, tmp_path_factory) -> Path:  # noqa: F811 (the fixture imported above)
    try:
        model = builtin_model_dir("smollm2-135m")
    except LMLoadError as exc:
        pytest.skip(f"the built-in model is not installed here ({exc})")
    project = tmp_path_factory.mktemp("saelens-user") / PROJECT
    project.mkdir()
    jsonl_folder(project)
    job = {"workdir": str(project), "model": str(model), "layer": LAYER, "dataset": "my-dataset", "d_sae": WIDTHS[-1],
           "widths": WIDTHS, "k": K, "steps": 300, "batch_tokens": 64, "context_size": 32}
    found = run_peer(side_python, {"train_saelens_runner": job}, project.parent, timeout=1500)["train_saelens_runner"]
    assert (found["architecture"], found["hook_name"], found["dataset_path"], found["context_size"]) == (
        "jumprelu", f"model.layers.{LAYER}", "my-dataset", 32)
    assert {"cfg.json", "sae_weights.safetensors"} <= set(found["files"])
    return project


@pytest.fixture(scope="module")
def analysed(project, tmp_path_factory) -> Path:
    """`msae analyze PROJECT/output`, nothing else, as the user types it (its own activation cache), from the folder
    above the project: the dataset SAELens recorded relative to where it ran is found beside the SAE's folder."""
    run = project / "output"
    env = dict(os.environ, MSAE_ACTIVATION_CACHE=str(tmp_path_factory.mktemp("cache")))
    done = subprocess.run([sys.executable, "-m", "msae.cli", "analyze", str(run)], cwd=project.parent, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert f"text: {project / 'my-dataset'}, the dataset SAELens recorded in cfg.json" in said, said[-2000:]
    return run


def test_msae_reads_the_sae_as_saelens_trained_it(analysed):
    sae = Run(analysed).load_sae()
    assert (sae.activation, sae.widths, sae.k) == ("batchtopk", WIDTHS, K)
    store = load_store(analysed)
    assert (store.manifest.layer, store.manifest.widths) == (LAYER, WIDTHS)
    assert store.manifest.rows > 500 and store.manifest.l0_per_width[-1] > 0
    assert store.links is not None and len(store.links) > 0, "no parent-child candidates across the nested groups"


def _choose_run(page, label: str) -> None:
    """Pick a run in the sidebar's run picker, as a user does: open the box, click the run's name; then wait until
    Home shows that run."""
    page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").click()
    page.get_by_role("option", name=label, exact=True).click()
    page.get_by_role("heading", name=f"Run {label}", exact=True).wait_for()
    wait_idle(page)


def _go_to(page, title: str) -> None:
    """Follow the sidebar's link to a page (the session, and so the chosen run, stays)."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for()
    wait_idle(page)


def _lower_until_a_tree_shows(page) -> None:
    """Do on the Hierarchy page what it tells a user until a tree figure shows. A 300-step SAE has few links as
    strong as the default rule asks (P(p|c) >= 0.9, lift >= 2): while it says "No links", lower the
    lift, then the link strength, with each slider's keyboard; while it says "No tree in this band", open the hubs'
    band (its few trees hang under dense roots). Each action is idempotent and the page is read again after it: a
    rerun that a slider starts may begin after the page looked idle, so one read can be stale. Fails when no tree
    comes within the page timeout."""
    chart = page.locator('[data-testid="stPlotlyChart"]')
    sliders = ["lift at least", "link strength at least"]
    deadline = time.monotonic() + PAGE_S
    while True:
        wait_idle(page)
        assert_no_errors(page, "Hierarchy")
        if chart.count():
            return
        if page.get_by_text("No links at these settings").count() and sliders:
            setting = sliders.pop(0)
            slider = page.locator('[data-testid="stSlider"]').filter(has_text=setting).get_by_role("slider")
            slider.focus()
            slider.press("Home")
            continue
        if page.get_by_text("No tree in this band at these settings").count():
            page.get_by_text("hubs (root fires on", exact=False).click()
        if time.monotonic() > deadline:
            raise AssertionError("no tree figure on the Hierarchy page, with the lift and link strength at their "
                                 "lowest and the hubs' band open")
        page.wait_for_timeout(500)  # the rerun the last action started, if it has not begun yet


def test_the_analysed_sae_opens_on_features_and_hierarchy_in_the_browser(analysed, tmp_path):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MSAE_RUNS=str(analysed.parent), MSAE_WRITE_DIR=str(tmp_path / "written"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    server = Server(tmp_path / "server.log", env)
    try:
        server.wait_healthy()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(PAGE_S * 1000)
            page.console_errors = []
            page.on("pageerror", lambda e: page.console_errors.append(f"page error: {e}"))
            with step(page, server, "saelens-e2e"):
                page.goto(server.url)
                page.get_by_role("heading", name="msae: Matryoshka SAE explorer", exact=True).wait_for()
                wait_idle(page)
                _choose_run(page, f"{PROJECT}/output")
                assert_no_errors(page, "Home, the SAELens-trained run")
                _go_to(page, "Features")
                assert_no_errors(page, "Features")
                header = page.locator("h2").first.inner_text()
                assert header.startswith("#"), f"Features shows {header!r}, not a latent"
                screenshot(page, "e2e_saelens_features")
                _go_to(page, "Hierarchy")
                assert_no_errors(page, "Hierarchy")
                assert page.get_by_text("single width").count() == 0, "the nested widths were not read"
                _lower_until_a_tree_shows(page)
                # The table of the trees in view comes first: bring the figure into view and let plotly draw it.
                chart = page.locator('[data-testid="stPlotlyChart"]')
                chart.first.scroll_into_view_if_needed()
                chart.first.locator(".main-svg").first.wait_for()
                screenshot(page, "e2e_saelens_hierarchy")
            browser.close()
    finally:
        server.stop()
        shutil.copy(server.log, ARTIFACTS / "server-saelens-e2e.log")
