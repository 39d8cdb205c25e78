"""Small file helpers shared by the data modules: atomic writes and gzip-aware text IO.

Writes go to a temporary file in the target's folder and are then moved into place with
`os.replace`, so a crash or a concurrent reader never sees a half-written file.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_gzip(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gz")


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a UTF-8 text file for reading; `.gz` files are decompressed on the fly."""
    if _is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


@contextmanager
def atomic_write_text(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Context manager yielding a text stream; the file appears at `path` only on success.

    `.gz` targets are gzip-compressed with mtime 0, so the same content gives the same bytes
    (reproducible package data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            if _is_gzip(path):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                        io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as text:
                    yield text
            else:
                with io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as text:
                    yield text
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a finished folder `src` to `dst`, replacing any folder already there.

    `os.replace` cannot overwrite a non-empty folder, so an existing `dst` is first renamed
    aside and removed only after the new one is in place.
    """
    dst = Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
