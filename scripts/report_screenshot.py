"""Screenshot of a run's HTML report in headless Chromium (the README's ``docs/report.png``).

    python scripts/report_screenshot.py runs/report-demo/report/index.html docs/report.png

Needs selenium (``pip install -e ".[test]"``) and the OS packages chromium and
chromium-driver. The top ``--height`` pixels of the page at ``--width``, as a 256-colour PNG.
"""

import argparse
import io
import shutil
import sys
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("page", type=Path, help="RUN/report/index.html")
    p.add_argument("png", type=Path, help="where to write the screenshot")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=2400)
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        metrics = {"width": args.width, "height": args.height, "deviceScaleFactor": 1}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": False})
        browser.get(args.page.resolve().as_uri())
        png = browser.get_screenshot_as_png()
    finally:
        browser.quit()
    picture = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
    picture.save(args.png, optimize=True)
    print(f"{args.png}: {picture.width}x{picture.height}, {args.png.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
