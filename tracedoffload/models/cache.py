"""The converted-model cache: a GGUF file is dequantized once and loaded from safetensors after.

Layout under the cache root (`$XDG_CACHE_HOME/tracedoffload`, else `~/.cache/tracedoffload`):

    models/<sha256 of the GGUF>/     what `save_pretrained` wrote, and manifest.json
    digests/<sha256 of its path>.json  the GGUF's size, mtime and sha256

An entry is keyed by the GGUF's content, so a file renamed or copied elsewhere finds its entry and
a file replaced in place does not find the old one. Hashing a large GGUF on every start would cost
seconds, so its digest is kept beside its size and mtime and reused while both match (what git's
index and ccache do).

An entry is built in a temporary directory beside it and renamed into place, which is atomic on
one file system: a run killed mid-write leaves at most a temporary directory (removed by the next
build once its process is gone), never a half entry under the final name. The manifest, written
last, records every file's size and sha256; an entry is trusted only when each file matches, so a
truncated or corrupted entry is removed and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_HASH_CHUNK = 1 << 24


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/tracedoffload`, else `~/.cache/tracedoffload` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tracedoffload"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks (a GGUF may be many GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(path: Path, root: Path) -> str:
    """The sha256 of `path`'s content, hashed only when its size or mtime changed since last time."""
    stat = path.stat()
    record_file = root / "digests" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()}.json"
    try:
        record = json.loads(record_file.read_text())
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record yet, or an unreadable one: hash the file
    sha256 = file_sha256(path)
    record = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        _write_atomically(record_file, json.dumps(record))
    except OSError:
        pass  # a read-only cache still works; the file is hashed again next time
    return sha256


def entry_path(root: Path, key: str) -> Path:
    return root / "models" / key


def verified_entry(root: Path, key: str) -> Path | None:
    """The entry for `key` when it is complete and every file matches its manifest; else None.

    An entry that exists but does not verify is removed, so the caller rebuilds it.
    """
    entry = entry_path(root, key)
    if not entry.exists():
        return None
    if _matches_manifest(entry):
        return entry
    _remove(entry)
    return None


def build_entry(root: Path, key: str, write: Callable[[Path], None]) -> Path:
    """Make the entry for `key`: `write(directory)` fills a temporary directory, which gets its
    manifest and is then renamed into place.

    Another process that publishes the same key first wins; its entry is used when it verifies.
    `write`'s exceptions propagate, with the temporary directory removed.
    """
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(models, key)
    building = models / f".{key}.{os.getpid()}.building"
    _remove(building)
    try:
        building.mkdir()
        write(building)
        _write_manifest(building)
        final = entry_path(root, key)
        if final.exists():
            _remove(final)  # it failed verification (the caller checked first)
        try:
            building.rename(final)
        except OSError:
            # Another process renamed its build into place between our check and our rename.
            if verified_entry(root, key) is None:
                raise
        return final
    finally:
        _remove(building)


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    manifest = {
        "version": _MANIFEST_VERSION,
        "files": {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
    }
    # Written last: an entry without a manifest is incomplete by definition.
    _write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1))


def _matches_manifest(entry: Path) -> bool:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("version") != _MANIFEST_VERSION or not files:
            return False
        for name, expected in files.items():
            path = entry / name
            # The size first: a truncated file fails without being read.
            if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_abandoned_builds(models: Path, key: str) -> None:
    """Remove temporary directories of `key` left by processes that no longer run (a killed build)."""
    for leftover in models.glob(f".{key}.*.building"):
        try:
            pid = int(leftover.name.split(".")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _process_alive(pid):
            _remove(leftover)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
