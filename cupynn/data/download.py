"""Finding dataset folders and fetching official files into the cache.

Everything that touches the network goes through :func:`fetch_url`, so tests
replace that one function (``monkeypatch.setattr(download, "fetch_url", fake)``)
and never need a connection. A download is written to ``<name>.part`` beside
its destination, checked (size and MD5 when known) and only then renamed over
the destination, so an interrupted or corrupt download never takes the place
of a file.

Folders searched when no folder is named (relative to the working directory):
``$CUPYNN_DATA/<dataset>`` when the variable is set, ``datasets/<dataset>``
(the git-ignored cache that downloads go to) and ``../shared/data/<dataset>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import urllib.request
from pathlib import Path
from typing import BinaryIO

DATA_ENV = "CUPYNN_DATA"
CACHE_ROOT = Path("datasets")
TIMEOUT_S = 30.0


class DownloadError(OSError):
    """A file could not be fetched, or what arrived failed its checks."""


def absolute(path: Path | str) -> Path:
    """``path`` made absolute and normalised (``..`` resolved, links kept), for messages."""
    return Path(os.path.abspath(path))


def search_folders(dataset: str) -> list[Path]:
    """The folders searched for ``dataset`` (e.g. ``"kmnist"``) when none is named, in order."""
    folders = []
    root = os.environ.get(DATA_ENV)
    if root:
        folders.append(Path(root) / dataset)
    folders += [CACHE_ROOT / dataset, Path("..") / "shared" / "data" / dataset]
    return folders


def cache_folder(dataset: str) -> Path:
    """Where downloads and parsed caches of ``dataset`` go: ``datasets/<dataset>``."""
    return CACHE_ROOT / dataset


def md5sum(path: Path | str, block: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problem(path: Path | str, size: int | None = None,
                     md5: str | None = None) -> str | None:
    """Compare a file with its expected size and MD5; ``None`` when it matches.

    Otherwise a phrase to follow the file's name in a message, e.g.
    ``"has 1,024 bytes, but the official file has 3,079,479 (truncated or corrupt)"``.
    The size is checked first: it is free and catches truncated files.
    """
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        why = "truncated or corrupt" if actual < size else "corrupt or not the official file"
        return f"has {actual:,} bytes, but the official file has {size:,} ({why})"
    if md5 is not None:
        digest = md5sum(path)
        if digest != md5:
            return (f"has MD5 {digest}, but the official file has MD5 {md5} "
                    "(corrupt or not the official file)")
    return None


def fetch_url(url: str, out: BinaryIO, *, progress: bool = True, desc: str | None = None,
              timeout: float = TIMEOUT_S) -> None:
    """Stream ``url`` into the open binary file ``out``, with a tqdm progress bar.

    The only function in cupynn that opens a network connection. Raises
    ``OSError`` (``urllib.error.URLError``, timeouts) or
    ``http.client.HTTPException`` when the transfer fails.
    """
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc or url.rsplit("/", 1)[-1], disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def download_file(url: str, dest: Path | str, *, size: int | None = None, md5: str | None = None,
                  progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (replacing it), checking size and MD5 when given.

    Parameters
    ----------
    url : str
    dest : path
        The file to write; its folder is created when missing.
    size, md5 : int or str, optional
        The official file's size in bytes and hex MD5 digest.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DownloadError
        When the transfer fails (no network, HTTP error, unwritable folder) or
        the file that arrived does not match ``size``/``md5``; ``dest`` is then
        left as it was.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    # Folders this call creates, deepest first: removed again if the download fails, so
    # that a failed attempt leaves no trace (and "no such folder" stays true in messages).
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as out:
            fetch_url(url, out, progress=progress, desc=dest.name)
        problem = checksum_problem(part, size, md5)
        if problem is not None:
            raise DownloadError(f"The file downloaded from {url} {problem}; it was discarded.")
        os.replace(part, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, DownloadError):
            raise
        if isinstance(exc, (OSError, http.client.HTTPException, ValueError)):
            raise DownloadError(f"Downloading {url} to {absolute(dest)} failed "
                                f"({type(exc).__name__}: {exc}).") from exc
        raise
    return dest
