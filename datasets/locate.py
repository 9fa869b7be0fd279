"""Where data lives: one rule for every loader.

A data set is found, in this order:

1. the path given on the command line (``path=`` here),
2. the path in the data set's environment variable (e.g. ``SSMLAB_IMDB``),
3. the user cache folder (``$SSMLAB_DATA``, else ``$XDG_CACHE_HOME/ssmlab``,
   else ``~/.cache/ssmlab``), where a download is kept,
4. a download from the official address, verified by its checksum.

A path may name a file or a folder (loaders decide which layouts they take).
When none of this works (offline, corrupt file, wrong checksum) one
`DataError` says what was tried and where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from tqdm.auto import tqdm

PathLike = Union[str, os.PathLike]


class DataError(RuntimeError):
    """Data is missing, unreachable or corrupt; the message says how to fix it."""


@dataclass(frozen=True)
class DataSource:
    """A data set that can be downloaded: its official address and checksum."""

    name: str  # human-readable, used in messages
    url: str  # official address
    filename: str  # name of the file in the cache folder
    env_var: str  # environment variable that may point at a local copy
    md5: Optional[str] = None  # checksum of the official file (either one)
    sha256: Optional[str] = None

    def verify(self, path: Path) -> None:
        """Raise DataError unless the file at `path` has this source's checksum."""
        for algo, expected in (("sha256", self.sha256), ("md5", self.md5)):
            if expected:
                got = file_digest(path, algo)
                if got != expected:
                    raise DataError(
                        f"{self.name}: {path} has {algo} {got}, expected {expected} "
                        f"(corrupt or partial download?). Delete it and download again from {self.url}"
                    )
                return


def cache_dir() -> Path:
    """The user cache folder for downloads."""
    if os.environ.get("SSMLAB_DATA"):
        return Path(os.environ["SSMLAB_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssmlab"


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _where_to_put(source: DataSource) -> str:
    return (
        f"download {source.url} yourself and pass its path with the script's data flag, "
        f"or set {source.env_var}=/path/to/it, or place it at {cache_dir() / source.filename}"
    )


def download(source: DataSource, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch `source.url` into `dest` atomically (temporary file, verify, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source.url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {source.name}") as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        source.verify(Path(tmp))
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataError(f"{source.name}: could not download {source.url} ({err}); {_where_to_put(source)}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve(source: DataSource, path: Optional[PathLike] = None, *, allow_download: bool = True) -> Path:
    """Find `source` by the rule above and return its path.

    An explicit path (argument or environment variable) must exist; it is not
    checksum-verified, since local copies may be repackaged (loaders check
    structure instead). A cached or downloaded file is verified.
    """
    for given, origin in ((path, "the given path"), (os.environ.get(source.env_var), f"${source.env_var}")):
        if given:
            p = Path(given).expanduser()
            if not p.exists():
                raise DataError(f"{source.name}: {origin} {p} does not exist; {_where_to_put(source)}")
            return p
    cached = cache_dir() / source.filename
    if cached.exists():
        source.verify(cached)
        return cached
    if not allow_download:
        raise DataError(f"{source.name}: not found and downloads are disabled; {_where_to_put(source)}")
    return download(source, cached)

