"""Screenshot a tunelab report in headless Chromium: python scripts/screenshot_report.py REPORT.html [OUT.png]."""
import sys
from pathlib import Path

from tunelab.plots import screenshot

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    html = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else html.with_name("report-screenshot.png")
    print(screenshot(html, out, height=4000))
