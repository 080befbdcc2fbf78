"""Open a report page in headless Chromium and save a screenshot of it.

    .venv/bin/python benchmarks/report_screenshot.py                       # makes a report first
    .venv/bin/python benchmarks/report_screenshot.py --page runs/demo/report/index.html

Without --page it runs a small comparison on the embedded tiny FLUX (RTN and PermuQuant at
W4A4 INT4 g64 and W3A3 INT3 g64, 1 image per digit) into --out, then screenshots its
index.html to benchmarks/results/report_screenshot.png. Needs Chromium (Debian:
`apt-get install chromium`); no network is used by the page or the browser.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no chromium on PATH (Debian: apt-get install -y chromium)")


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 3000) -> Path:
    """Render `page` (a local HTML file) at width x height CSS pixels into the PNG `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    return out


def make_report(out: Path) -> Path:
    from pqjax.api import calibrate_pipeline
    from pqjax.eval.compare import EvalSpec, compare
    from pqjax.eval.metrics import DigitMetrics
    from pqjax.pipelines.load import load_pipeline
    from pqjax.quantize import QuantConfig

    fp = load_pipeline()
    calib = calibrate_pipeline(fp, n_rows=256)
    configs = [QuantConfig(weights=w, acts=w, group=64, method=m)
               for w in ("int4", "int3") for m in ("rtn", "permuquant")]
    compare(fp, calib, configs, EvalSpec.digits(per_digit=1), out, digit_metrics=DigitMetrics())
    return out / "index.html"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=Path, help="an existing report index.html")
    parser.add_argument("--out", type=Path, default=Path("runs/report_screenshot"))
    parser.add_argument("--png", type=Path, default=RESULTS / "report_screenshot.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    chromium()  # fail before any work if there is no browser
    page = args.page or make_report(args.out)
    if not page.is_file():
        raise SystemExit(f"--page {page}: no such file")
    shot = screenshot(page, args.png, args.width, args.height)
    print(f"{page} -> {shot}")


if __name__ == "__main__":
    main()
