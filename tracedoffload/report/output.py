"""Where the HTML report goes: the path checked before any work, the page written atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tracedoffload._exceptions import ConfigError

FIELD = "html"


def check_html_path(path: Path) -> Path:
    """A path the report can be written to: not a directory, in a directory that exists and is
    writable. Checked before the trace is read or the model loaded, so a typo costs nothing. The
    directory is not created: a missing one is more likely a typo than a wish.

    Raises:
        ConfigError: naming the `html` field and what is wrong with the path.
    """
    if path.is_dir():
        raise ConfigError(FIELD, str(path), "a file path (this is a directory)")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(FIELD, str(path), f"a file in an existing directory ({str(parent)!r} does not exist)")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(FIELD, str(path), "a writable file path")
    return path


def write_atomically(path: Path, text: str) -> int:
    """Write `text` to `path` through a temporary file in the same directory, renamed over it once
    complete: a reader (or a failure halfway) never sees half a page. Returns the bytes written.

    Raises:
        ConfigError: the file could not be written (naming the `html` field and the reason).
    """
    data = text.encode("utf-8")
    # A unique name created with "x": the new file gets the umask's mode, as a plain open would
    # (tempfile's are 0600, which a report meant to be shared should not be).
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigError(FIELD, str(path), f"a file that can be written ({error.strerror or error})") from None
    return len(data)
