"""Debian packages the tests need, installed by the tests themselves when missing (CI is a fresh
machine; needs root): apt-get update, then apt-get install without recommends."""

from __future__ import annotations

import os
import shutil
import subprocess


def binary(*names: str) -> str | None:
    """The path of the first of `names` found on PATH, or None."""
    return next((path for path in map(shutil.which, names) if path), None)


def apt_install(*packages: str) -> None:
    """Install `packages` from Debian's archive.

    Raises:
        RuntimeError: apt-get failed; the message holds the end of its error output.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
