"""The README's picture of the serve page: ``python docs/serve_screenshot.py URL [OUT]`` with a
``mambastyle serve`` running at URL; uploads a demo photo, moves the first slider to its top, and
saves a screenshot (default docs/serve.png). Needs Debian's chromium."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from mambastyle.data.demo import demo_files


def main(url: str, out: str = "docs/serve.png") -> None:
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        photo = Path(tmp) / "grace_hopper.jpg"
        photo.write_bytes(demo_files()["grace_hopper/original.jpg"])
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(url)
        page.wait_for_selector("#sliders input[type=range]")
        page.set_input_files("#photo", str(photo))
        page.wait_for_function("document.getElementById('edited').dataset.version === '1'", timeout=60000)
        page.locator("#sliders input[type=range]").first.focus()
        page.keyboard.press("End")
        page.wait_for_function(
            "Number(document.getElementById('edited').dataset.version) >= 2", timeout=60000
        )
        page.wait_for_function("document.getElementById('status').textContent === 'Edited.'")
        page.screenshot(path=out, full_page=True)
        browser.close()
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
