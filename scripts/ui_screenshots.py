"""Screenshots of `tunelab ui` on real runs, for the docs: the runs table and the playground's before/after view of
the SmolLM2 EN→FR LoRA run that `python scripts/docs_results.py compare-translate-fr` trains.

    python scripts/ui_screenshots.py [--runs-dir runs] [--out docs/images]

It starts `tunelab ui` on a free loopback port, drives it with Playwright and the system's headless Chromium
(as tests/unit/test_ui_browser.py does), and stops it."""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RUN = "compare-compare-translate-fr/runs/lora"
PROMPT = "Save changes"


def main() -> int:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser()
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    if not (Path(args.runs_dir) / RUN / "status.json").exists():
        print(f"no {RUN} under {args.runs_dir}: run `python scripts/docs_results.py compare-translate-fr` first")
        return 2
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--port", str(port), "--runs-dir", args.runs_dir],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=browser)
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/runs/{RUN}")
            page.fill("#try-text", PROMPT)
            page.click("#try")
            page.wait_for_selector("#before-after", timeout=300_000)
            page.locator("#try-form").scroll_into_view_if_needed()  # the prompt and both answers in view
            page.screenshot(path=out / "ui-before-after-smollm2.png")
            print(f"{PROMPT!r} → base: {page.locator('#base-answer').inner_text()!r} · this run: "
                  f"{page.locator('#tuned-answer').inner_text()!r}")
            b.close()
    finally:
        ui.terminate()
        ui.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
