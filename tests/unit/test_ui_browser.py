"""`tunelab ui` driven in a real browser (Playwright on the system's headless Chromium) against a real `tunelab ui`
process on loopback: the form, a validation error, a run started and watched to `completed` with its loss chart,
the playground, and a second run stopped (left `interrupted`). Screenshots of every page go to
$TUNELAB_UI_SCREENSHOTS (the README's come from there: `TUNELAB_UI_SCREENSHOTS=docs/images pytest -k browser`)
or to the test's folder."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import sample_rows, write_jsonl

playwright = pytest.importorskip("playwright.sync_api")
BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium (apt-get install "
                                                        "chromium-headless-shell; CI installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """A `tunelab ui` process in `tmp_path` (its runs folder tmp_path/runs); yields its base URL."""
    port = _free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--port", str(port), "--runs-dir", "runs"],
                            cwd=tmp_path, env=env, stdout=open(tmp_path / "ui.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("tunelab ui exited: " + (tmp_path / "ui.log").read_text())
            time.sleep(0.25)
    yield url
    proc.terminate()
    proc.wait(10)
    for job in (tmp_path / "runs" / ".ui" / "jobs").glob("*.json"):  # no training process outlives the test
        import json

        try:
            os.killpg(json.loads(job.read_text())["pid"], 9)
        except OSError:
            pass


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        b.close()


def _shots(tmp_path) -> Path:
    out = Path(os.environ.get("TUNELAB_UI_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wait_state(page, url: str, state: str, timeout: float = 180) -> None:
    """Reload the run page until its state badge says `state` (the page also refreshes itself while running)."""
    end = time.time() + timeout
    while time.time() < end:
        page.goto(url)
        if page.locator("#state").inner_text().strip() == state:
            return
        time.sleep(1)
    pytest.fail(f"{url} did not reach {state}: it says {page.locator('#state').inner_text()}\n"
                + page.locator("body").inner_text()[:3000])


def test_classification_run_from_form_to_playground_and_stop(ui, browser, tmp_path, tiny_bert):
    page, shots = browser, _shots(tmp_path)
    data = write_jsonl(tmp_path / "reviews.jsonl", sample_rows(160))
    page.goto(ui + "/")
    assert page.locator("#empty").is_visible()  # no runs: a clear page
    page.screenshot(path=shots / "ui-empty.png")

    # the form: method head (its own options appear), a bad learning rate refused inline with the CLI's words
    page.goto(ui + "/new")
    page.select_option("#method", "head")
    page.wait_for_url("**/new?*method=head*")  # the form was redrawn for head: LoRA's options are gone
    assert page.locator("[id='method.r']").count() == 0
    page.fill("#name", "tiny")
    page.fill("[id='model.name']", str(tiny_bert))
    page.fill("[id='model.max_length']", "64")
    page.fill("[id='data.train']", str(data))
    page.fill("[id='train.max_steps']", "6")
    page.fill("[id='train.batch_size']", "16")
    page.fill("[id='train.logging_steps']", "1")
    page.select_option("[id='train.precision']", "fp32")
    page.fill("[id='train.lr']", "-1")
    page.click("#validate")
    error = page.locator("[id='error-train.lr']")
    assert "greater than 0" in error.inner_text()
    page.screenshot(path=shots / "ui-new-run-error.png", full_page=False)
    page.fill("[id='train.lr']", "0.001")
    page.click("#validate")
    assert page.locator("#valid").is_visible() and "lr: 0.001" in page.locator("#yaml").inner_text()
    page.screenshot(path=shots / "ui-new-run.png", full_page=True)

    # start it; the run page watches it to completed, with the loss chart drawn
    page.click("#start-train")
    page.wait_for_url(ui + "/runs/tiny")
    _wait_state(page, ui + "/runs/tiny", "completed")
    chart = page.locator("#loss-chart")
    assert chart.is_visible() and chart.evaluate("img => img.naturalWidth") > 100
    assert page.locator("#metrics").is_visible() and page.locator("#confusion").is_visible()
    page.screenshot(path=shots / "ui-run.png", full_page=True)

    # the playground: probabilities per label
    page.fill("#try-text", "a wonderful, moving film")
    page.click("#try")
    rows = page.locator("#probabilities tr")
    assert rows.count() == 3  # header + negative + positive
    labels = {rows.nth(i).locator("td").first.inner_text() for i in (1, 2)}
    assert labels == {"negative", "positive"}
    page.wait_for_function("document.getElementById('loss-chart').complete")  # the chart is drawn on request
    page.screenshot(path=shots / "ui-playground.png", full_page=True)

    # the runs table lists it with its metric
    page.goto(ui + "/")
    assert "accuracy" in page.locator("#runs").inner_text()
    page.screenshot(path=shots / "ui-runs.png")

    # a second, long run: started, seen running, stopped → interrupted, and offered a resume
    page.goto(ui + "/new?method=head")
    page.fill("#name", "long")
    page.fill("[id='model.name']", str(tiny_bert))
    page.fill("[id='data.train']", str(data))
    page.fill("[id='train.max_steps']", "100000")
    page.fill("[id='train.batch_size']", "4")
    page.select_option("[id='train.precision']", "fp32")
    page.click("#start-train")
    page.wait_for_url(ui + "/runs/long")
    end = time.time() + 120
    while time.time() < end and not page.locator("#progress").count():
        time.sleep(1)
        page.goto(ui + "/runs/long")
    assert page.locator("#progress").count(), page.locator("body").inner_text()[:2000]
    assert "/ 100000" in page.locator("#progress").inner_text()
    page.screenshot(path=shots / "ui-running.png", full_page=True)
    page.click("#stop")
    _wait_state(page, ui + "/runs/long", "interrupted", timeout=60)
    end = time.time() + 60  # the process writes `interrupted`, then exits: Resume is offered once it is gone
    while time.time() < end and not page.locator("#resume").count():
        time.sleep(1)
        page.goto(ui + "/runs/long")
    assert page.locator("#resume").is_visible()
    assert "stopped by the user" in page.locator("#run-error").inner_text()
    page.screenshot(path=shots / "ui-interrupted.png", full_page=True)


def test_generative_run_base_and_tuned_side_by_side(ui, browser, tmp_path, tiny_llama):
    """A generative run (trained here through the API, as the UI's job would) answers next to its base model."""
    import tunelab

    page, shots = browser, _shots(tmp_path)
    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ["good", "bad", "great", "awful"] * 10]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    import yaml

    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama), "max_length": 32}, "task": "sft",
        "data": {"train": str(data), "split": {"validation": 0.1, "test": 0.1}, "leakage": "ignore",
                 "prompt_format": "alpaca"},
        "method": {"name": "lora", "r": 4}, "train": {"max_steps": 3, "precision": "fp32"},
        "eval": {"forgetting": None, "max_generate": 2, "max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "runs" / "gen")}}))
    tunelab.train(cfg)
    page.goto(ui + "/")  # at 1280 px the runs filter is one line, its button beside the fields
    tops = [b["y"] for b in (page.locator("#filters > *").nth(i).bounding_box()
                             for i in range(page.locator("#filters > *").count()))]
    assert max(tops) - min(tops) < 12, tops  # a wrapped field would sit a whole line (~35 px) lower
    page.goto(ui + "/runs/gen")
    assert page.locator("#state").inner_text() == "completed"
    # test predictions: the user's message, the reference and the answer side by side, each a readable width; the
    # prompt as rendered (the Alpaca template here) only on demand
    table = page.locator("#samples")
    assert [c.inner_text() for c in table.locator("th").all()] == ["message", "reference", "answer"]
    first = table.locator("tr").nth(1).locator("td")
    assert first.nth(0).inner_text().startswith("say ") and not page.locator("#samples details pre").first.is_visible()
    assert "### Instruction" in page.locator("#samples details pre").first.text_content()
    width = table.bounding_box()["width"]
    assert all(first.nth(i).bounding_box()["width"] > width / 4 for i in range(3))
    page.fill("#try-text", "say good")
    page.fill("input[name=max_new_tokens]", "6")
    url = page.url
    page.click("#try")
    side = page.locator("#before-after")
    page.wait_for_selector("#before-after[data-state=done]", timeout=60_000)  # streamed in by the page's script
    assert page.url == url  # no page load: the answers came over /try/gen
    assert side.is_visible()
    assert page.locator("#try-error").count() == 0
    assert page.locator("#base-answer").count() == 1 and page.locator("#tuned-answer").count() == 1
    gen = tunelab.load(tmp_path / "runs" / "gen")
    expected = gen.generate([gen.render("say good")], max_new_tokens=6)[0]
    assert page.locator("#tuned-answer").inner_text().strip() == expected
    assert int(side.get_attribute("data-chunks")) >= 2
    assert "### Instruction" in page.locator("#before-after + details pre").text_content()
    page.screenshot(path=shots / "ui-before-after.png", full_page=True)


def test_a_page_on_another_site_cannot_start_a_run(ui, browser, tmp_path, tiny_bert):
    """A page the user has open elsewhere posts a complete New-run form to the UI — from another site (localhost
    on another port) and from the same site on another port (127.0.0.1:OTHER). Chromium sends those posts as
    it would for any page: the UI answers 403 with its sentence, and no job, config or run folder appears."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = write_jsonl(tmp_path / "reviews.jsonl", sample_rows(40))
    fields = {"name": "evil", "task": "classify", "method": "head", "f:model.name": str(tiny_bert),
              "f:data.train": str(data), "f:train.max_steps": "1", "action": "train"}
    inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    evil = (f'<!doctype html><form method="post" action="{ui}/new" enctype="multipart/form-data">{inputs}'
            f'<button id="go">Win a prize</button></form>').encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for site in (f"http://localhost:{server.server_port}/", f"http://127.0.0.1:{server.server_port}/"):
            page = browser
            page.goto(site)
            with page.expect_response(lambda r: r.url.startswith(ui + "/new")) as answer:
                page.click("#go")
            assert answer.value.status == 403, site
            assert "from another site" in page.locator("body").inner_text()
    finally:
        server.shutdown()
    runs = tmp_path / "runs"
    assert not (runs / "evil").exists() and not list((runs / ".ui").rglob("evil*"))
    assert not list((runs / ".ui" / "jobs").glob("*.json"))
