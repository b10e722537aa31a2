"""The converted-model cache: content keys, atomic builds, verification, rebuilds, a killed build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tracedoffload.models import cache


def write_files(directory):
    (directory / "config.json").write_text('{"a": 1}')
    (directory / "weights.bin").write_bytes(bytes(range(256)) * 64)


def flip_a_byte(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


class TestRoot:
    def test_xdg_cache_home(self, monkeypatch, tmp_path):
        """XDG_CACHE_HOME is honoured; without it, ~/.cache."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert cache.cache_root() == tmp_path / "tracedoffload"
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert cache.cache_root() == tmp_path / "home" / ".cache" / "tracedoffload"


class TestContentKey:
    def test_same_content_same_key_other_content_other_key(self, tmp_path):
        """The key is the content's sha256: a copy elsewhere finds the entry, an edit does not."""
        first, copy = tmp_path / "a.gguf", tmp_path / "b.gguf"
        first.write_bytes(b"GGUF" + b"x" * 1000)
        copy.write_bytes(first.read_bytes())
        root = tmp_path / "cache"
        assert cache.content_key(first, root) == cache.content_key(copy, root) == cache.file_sha256(first)
        first.write_bytes(b"GGUF" + b"y" * 1001)
        assert cache.content_key(first, root) == cache.file_sha256(first) != cache.content_key(copy, root)

    def test_digest_kept_with_size_and_mtime(self, tmp_path):
        """The digest is recorded beside the file's size and mtime, so the next start reads it back."""
        path = tmp_path / "m.gguf"
        path.write_bytes(b"GGUF1234")
        root = tmp_path / "cache"
        key = cache.content_key(path, root)
        (record,) = (root / "digests").iterdir()
        assert json.loads(record.read_text()) == {
            "path": str(path.resolve()), "size": 8, "mtime_ns": path.stat().st_mtime_ns, "sha256": key,
        }


class TestEntries:
    def test_build_then_verified(self, tmp_path):
        """A built entry holds the files and a manifest of their sizes and digests, and verifies."""
        entry = cache.build_entry(tmp_path, "k1", write_files)
        assert cache.verified_entry(tmp_path, "k1") == entry
        manifest = json.loads((entry / cache.MANIFEST).read_text())
        assert sorted(manifest["files"]) == ["config.json", "weights.bin"]
        assert manifest["files"]["weights.bin"]["size"] == 256 * 64
        assert not list((tmp_path / "models").glob(".*"))  # no temporary directory left

    @pytest.mark.parametrize("damage", ["flipped byte", "truncated", "file removed", "manifest removed", "manifest garbled"])
    def test_damaged_entry_is_removed_not_loaded(self, tmp_path, damage):
        """Any damage makes the entry fail verification; it is removed so the caller rebuilds it."""
        entry = cache.build_entry(tmp_path, "k1", write_files)
        weights = entry / "weights.bin"
        if damage == "flipped byte":
            flip_a_byte(weights)
        elif damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:-1])
        elif damage == "file removed":
            weights.unlink()
        elif damage == "manifest removed":
            (entry / cache.MANIFEST).unlink()
        else:
            (entry / cache.MANIFEST).write_text("{not json")
        assert cache.verified_entry(tmp_path, "k1") is None
        assert not entry.exists()
        assert cache.verified_entry(tmp_path, "k1") is None
        assert cache.verified_entry(tmp_path, "never-built") is None

    def test_failed_write_leaves_nothing(self, tmp_path):
        """A writer that raises leaves neither an entry nor a temporary directory."""
        def fail(directory):
            write_files(directory)
            raise RuntimeError("disk full")

        with pytest.raises(RuntimeError, match="disk full"):
            cache.build_entry(tmp_path, "k1", fail)
        assert list((tmp_path / "models").iterdir()) == []

    def test_a_killed_build_leaves_no_entry_and_is_cleaned_up(self, tmp_path):
        """A build killed mid-write (SIGKILL: no cleanup runs) leaves only its temporary
        directory; the entry does not exist, and the next build removes the leftover."""
        script = (
            "import sys, time, pathlib\n"
            "from tracedoffload.models import cache\n"
            "def slow(d):\n"
            "    (d / 'config.json').write_text('{}')\n"
            "    (d / 'started').write_text('')\n"
            "    time.sleep(600)\n"
            "cache.build_entry(pathlib.Path(sys.argv[1]), 'k1', slow)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
        try:
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob("models/.k1.*.building/started")):
                assert child.poll() is None and time.monotonic() < deadline, "the build never started"
                time.sleep(0.05)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert cache.verified_entry(tmp_path, "k1") is None
        assert len(list(tmp_path.glob("models/.k1.*.building"))) == 1
        entry = cache.build_entry(tmp_path, "k1", write_files)
        assert cache.verified_entry(tmp_path, "k1") == entry
        assert not list(tmp_path.glob("models/.k1.*"))
