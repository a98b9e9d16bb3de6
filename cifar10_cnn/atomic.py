"""Writing a file or a folder so that it is either complete or absent: never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(dest: Path, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside `dest` (a file, or a folder with `folder`) to write; renamed onto `dest`
    when the block ends without an error, and removed when it does not (Ctrl-C and a full disk included)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder and dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
