"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* variable from the machine running the tests; set the test's own on the result."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture(scope="session")
def default_model_xdg(tmp_path_factory: pytest.TempPathFactory):
    """An XDG_CACHE_HOME holding the default model's converted cache entry, converted once per session.

    Returns `(xdg_cache_home, loaded)`, where `loaded` is that first load: the GGUF converted.
    """
    from tracedoffload.models import load_model
    from tracedoffload.models.cache import cache_root

    xdg = tmp_path_factory.mktemp("xdg")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(xdg)
    try:
        root = cache_root()
    finally:
        if previous is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = previous
    return xdg, load_model(None, cache_dir=root)


@pytest.fixture(scope="session")
def default_model(default_model_xdg):
    """The default model (SmolLM2-135M-Instruct, dequantized) with its tokenizer: one per session,
    shared; a test that changes it must put it back."""
    return default_model_xdg[1]


@pytest.fixture
def in_tmp_dir(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Run the test in its own temporary directory: `run`'s default traces/ lands there, not in
    the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
