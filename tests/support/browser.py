"""A real browser for the tests: Debian's headless chromium (installed by
scripts/install_test_deps.sh, which scripts/run_tests.sh calls), offline,
with a fresh profile per call."""

import os
import shutil
import subprocess
import tempfile

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--virtual-time-budget=10000"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("chromium not found: run scripts/install_test_deps.sh (apt-get install chromium)")
    return path


def _run(args, timeout=180):
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(html_path: str, png_path: str, width: int = 1280, height: int = 3600) -> str:
    _run([f"--window-size={width},{height}", f"--screenshot={png_path}",
          "file://" + os.path.abspath(html_path)])
    return png_path


def dom(html_path: str) -> str:
    """The page's DOM after its load event (its scripts have run)."""
    return _run(["--dump-dom", "file://" + os.path.abspath(html_path)]).stdout
