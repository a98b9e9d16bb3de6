"""Where CIFAR-10 comes from: the `data` parameter as a local archive or folder, downloading (md5-checked,
cached) when it names a URL. Reading and checking what is found is data.py's job."""

from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import constants as C
from .atomic import replacing
from .errors import UserError
from .progress import bar

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where the data comes from: a local archive or an extracted folder, and the URL if downloaded."""

    path: Path
    kind: str  # "archive" | "directory"
    origin: str  # what to record as the dataset's source: a URL or an absolute path


# --- finding the data --------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloads are kept between runs ($CIFAR10_DATA_DIR, else ./data)."""
    return Path(os.environ.get(C.CACHE_DIR_ENV, C.DEFAULT_CACHE_DIR))


def resolve_source(data: str, cache_dir: Path, env: dict | None = None, fetch: bool = True) -> Source | None:
    """Turn the `data` parameter into a local archive or folder, downloading when it is a URL.

    'auto': the cached copy under `cache_dir` if present, else the archive named by $CIFAR10_ARCHIVE,
    else the official download (md5-checked). Otherwise `data` is a URL, an archive path or a folder.
    With `fetch=False` nothing is downloaded: a source that needs a download returns None, so a
    caller can check the parameter cheaply before any work starts.
    """
    env = os.environ if env is None else env
    data = str(data).strip()
    if not data:
        raise UserError("data must be 'auto', a URL, an archive path or a folder; got an empty string")
    if data == "auto":
        cached = cache_dir / C.ARCHIVE_NAME
        if cached.is_file():
            return Source(cached.resolve(), "archive", C.OFFICIAL_URL)
        if env.get(C.ARCHIVE_ENV):
            path = Path(env[C.ARCHIVE_ENV]).expanduser()
            if not path.exists():
                raise UserError(f"{C.ARCHIVE_ENV} names {path.resolve()}, which does not exist")
            return _local_source(path)
        if not fetch:
            return None
        return Source(download(C.OFFICIAL_URL, cached, md5=C.OFFICIAL_MD5), "archive", C.OFFICIAL_URL)
    try:
        scheme = urllib.parse.urlparse(data).scheme
    except ValueError as exc:  # e.g. http://[::1/x
        raise UserError(f"data: {data!r} is not a valid URL ({exc})") from None
    if scheme in ("http", "https"):
        if not fetch:  # known only once downloaded: then its bytes decide whether ingest can be reused
            cached = _cache_path(data, cache_dir)
            return Source(cached.resolve(), "archive", data) if cached.is_file() else None
        return Source(_download_cached(data, cache_dir), "archive", data)
    if scheme == "file":
        data = urllib.request.url2pathname(urllib.parse.urlparse(data).path)
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"data: {path.resolve()} does not exist")
    return _local_source(path)


def checked_data(data: str) -> tuple[str, Source | None]:
    """The `data` parameter checked without downloading anything, as main and tune pass it on to ingest: a
    path made absolute (the steps run in the project folder), and its Source (None: it needs a download)."""
    source = resolve_source(data, cache_dir(), fetch=False)
    data = str(data).strip()
    if data != "auto" and "://" not in data:
        data = str(Path(data).expanduser().resolve())
    return data, source


def cifar10_at(path: Path) -> Source | None:
    """`path` as CIFAR-10: a gzip archive, or a folder holding the test batch (or its batch folder); else None."""
    path = Path(path).resolve()
    if path.is_file():
        with path.open("rb") as fh:
            return Source(path, "archive", str(path)) if fh.read(2) == GZIP_MAGIC else None
    if any((folder / C.TEST_BATCH).is_file() for folder in (path / C.BATCH_DIR, path)):
        return Source(path, "directory", str(path))
    return None


def source_digest(source: Source) -> str:
    """sha256 of what ingest would read: the archive's bytes, or the folder's CIFAR-10 files in order.

    Cheap next to reading (one pass, no decompression), so main can tell whether the data changed.
    """
    h = hashlib.sha256()
    if source.kind == "archive":
        with source.path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    folder = source.path / C.BATCH_DIR if (source.path / C.BATCH_DIR).is_dir() else source.path
    for short in C.FILES:
        file = folder / short
        h.update(short.encode() + b"\0")
        if file.is_file():
            h.update(file.read_bytes())
    return h.hexdigest()


def _local_source(path: Path) -> Source:
    path = path.resolve()
    if path.is_dir():
        return Source(path, "directory", str(path))
    if not path.is_file():
        raise UserError(f"data: {path} is neither a regular file nor a folder")
    return Source(path, "archive", str(path))


def _cache_path(url: str, cache_dir: Path) -> Path:
    name = posixpath.basename(urllib.parse.urlparse(url).path) or C.ARCHIVE_NAME
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_dir / (C.ARCHIVE_NAME if url == C.OFFICIAL_URL else f"{key}-{name}")


def _download_cached(url: str, cache_dir: Path) -> Path:
    dest = _cache_path(url, cache_dir)
    if dest.is_file():  # only ever renamed into place once complete (and md5-checked if official)
        return dest.resolve()
    return download(url, dest, md5=C.OFFICIAL_MD5 if url == C.OFFICIAL_URL else None)


def download(url: str, dest: Path, md5: str | None = None, timeout_s: float = 60.0) -> Path:
    """Stream `url` to a temporary file beside `dest`, check the md5, then rename into place.

    An interrupted or failed download leaves no file named `dest`, so a later run never takes a
    partial file for good data.
    """
    import http.client

    digest = hashlib.md5(usedforsecurity=False)
    with replacing(dest) as tmp:
        received = 0
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, tmp.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with bar(total=total, desc=f"download {dest.name}", unit="B", unit_scale=True) as pbar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        pbar.update(len(chunk))
        # URLError, HTTPError, timeouts and socket errors are OSErrors; a cut chunked reply is IncompleteRead;
        # a malformed URL (http://[::1/x, a space in the host) is a ValueError or InvalidURL
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise UserError(f"data: could not download {url}: {exc}") from None
        if total is not None and received != total:  # the server closed early: read() just returns b""
            raise UserError(f"data: the download of {url} stopped after {received:,} of its {total:,} bytes; "
                            "nothing was kept, run again")
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(
                f"data: {url} downloaded with md5 {digest.hexdigest()}, expected {md5} "
                "(corrupt or not the official archive); nothing was kept"
            )
    return dest.resolve()
