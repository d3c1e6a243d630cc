"""Refresh the README's pictures from a ``make demo`` run: its loss and accuracy plots and
confusion matrix, and a screenshot of the web page taken in headless Chromium.

    python scripts/readme_pictures.py [--demo-output demo-output] [--out docs]

``make pictures`` runs the demo first, then this.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from spam_gpt.demo import CHAPTER_EXAMPLES
from spam_gpt.server import wait_until_healthy

PLOTS = ("loss-plot.png", "accuracy-plot.png", "confusion-matrix.png")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def screenshot_page(url: str, target: Path) -> None:
    """Type the chapter's spam example into the page, classify it, and save the window."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,620"):
        options.add_argument(flag)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "text").send_keys(CHAPTER_EXAMPLES[0])
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(
            expected_conditions.presence_of_element_located((By.ID, "label"))
        )
        driver.save_screenshot(str(target))
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-output", default="demo-output", type=Path)
    parser.add_argument("--out", default="docs", type=Path)
    args = parser.parse_args()
    train = args.demo_output / "train"
    if not (train / "model").is_dir():
        print(f"{train / 'model'} is missing: run `make demo` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        shutil.copy(train / name, args.out / name)
    port = free_port()
    spam_gpt = Path(sys.executable).with_name("spam-gpt")
    server = subprocess.Popen(
        [str(spam_gpt), "serve", "--model", str(train / "model"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout=300)
        time.sleep(1)
        screenshot_page(url, args.out / "web-page.png")
    finally:
        server.terminate()
        server.wait(timeout=120)
    print(f"Pictures in {args.out}: {', '.join([*PLOTS, 'web-page.png'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
