"""A headless browser's view of an HTML page: its layout width at a window width, and a screenshot.

Uses Debian's ``chromium-headless-shell`` (or ``chromium``) when installed (``.ci/run`` installs it
as root on Debian: ``apt-get install chromium-headless-shell``); tests that need it skip without it.
``python tests/browser.py REPORT.html PNG`` writes the docs' screenshot (``make report-screenshot``)
and prints the page's width.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
MEASURE = ("<script>window.addEventListener('load', () => { document.title = 'scrollWidth=' + "
           "document.documentElement.scrollWidth; });</script>")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def page_width(page: Path, width: int = 1366, browser: str | None = None) -> int:
    """The laid-out width in CSS px of ``page`` in a ``width`` px window: ``width`` when nothing
    sticks out, more when the page scrolls sideways (``document.documentElement.scrollWidth``)."""
    browser = browser or find_browser()
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "page.html"
        copy.write_text(Path(page).read_text().replace("</body>", MEASURE + "</body>"))
        done = subprocess.run([browser, *FLAGS, f"--window-size={width},900", "--dump-dom", copy.as_uri()],
                              capture_output=True, text=True, timeout=120, cwd=folder)
    found = re.search(r"scrollWidth=(\d+)", done.stdout)
    if not found:
        raise RuntimeError(f"{browser} gave no layout width: {done.stderr[-500:]}")
    return int(found[1])


def screenshot(page: Path, png: Path, width: int = 1366, height: int = 2400, browser: str | None = None) -> Path:
    """A ``width`` × ``height`` px screenshot of the top of ``page``."""
    browser = browser or find_browser()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([browser, *FLAGS, f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                        Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=120, cwd=folder,
                       check=True)
    return png


if __name__ == "__main__":
    page, png = Path(sys.argv[1]), Path(sys.argv[2])
    if find_browser() is None:
        sys.exit("No headless Chromium: as root on Debian, apt-get install chromium-headless-shell.")
    print(f"{page}: {page_width(page)} px wide in a 1366 px window; screenshot {screenshot(page, png)}")
