"""Debian's headless chromium for tests that look at rendered HTML.

Installs it with apt-get when missing, as slurm_cluster.py installs Slurm (CI starts from a
clean Debian machine as root); elsewhere the caller skips with BrowserUnavailable's reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("chromium",)
BINARIES = ("chromium",)


class BrowserUnavailable(RuntimeError):
    pass


def ensure_chromium() -> str:
    """Idempotent: the chromium binary's path, installed with apt-get first when missing."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrowserUnavailable(
            f"chromium is not installed and apt-get as root is not available: install {' '.join(PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
        if proc.returncode != 0:
            raise BrowserUnavailable(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        raise BrowserUnavailable("after apt-get install chromium, no chromium binary on PATH")
    return found


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 2400, timeout: float = 60) -> Path:
    """A PNG of `html` as headless chromium renders it at width x height CSS pixels."""
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start. A throwaway
    # profile dir keeps runs independent of each other and of any user profile.
    profile = out.parent / f".chromium-profile-{out.stem}"
    cmd = [
        ensure_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--window-size={width},{height}",
        f"--screenshot={out}", html.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium screenshot failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out
