"""A committed study's MLflow store is kept in git compressed: ``studies/NAME/mlflow.db.xz``.

Why: the five SQLite stores were 16.5 of the tree's 39.2 MiB (MLflow's metric indexes mostly) and pack
to 1.2 MiB; the whole working tree travels to a lent GPU machine, whose limit is 64 MiB with the GPU
check's wheels and data (scripts/gpu/build_bundle.sh): 70.9 MiB before, 54.9 after (2026-12-07).

The store a command opens is still ``sqlite:///studies/NAME/mlflow.db``: that file is a git-ignored
working copy, unpacked from the ``.xz`` beside it on first use, and again whenever the ``.xz`` changes
(a pull, a checkout), which the hash of the ``.xz`` it came from, kept beside it, tells. Until then the
working copy is left as it is. ``scripts/pack_study.py`` writes the ``.xz`` of a finished study.

Unpacking is atomic (a temporary file, then a rename), so processes that open the same committed store
at once (pytest workers, a report beside the UI) each see a whole store.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import tempfile
from pathlib import Path

SUFFIX = ".xz"
FROM = ".from-xz"  # beside the working copy: the sha256 of the .xz it was unpacked from
PRESET = 9  # the same bytes from the same store (lzma is deterministic for one preset and check)
CHUNK = 1 << 20


def packed(db: Path) -> Path:
    """The compressed store that stands for the working copy ``db``."""
    return db.with_name(db.name + SUFFIX)


def _stamp(db: Path) -> Path:
    return db.with_name(db.name + FROM)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unpack(db: Path) -> bool:
    """Make ``db`` the working copy of its ``.xz`` when there is one and ``db`` is missing or was
    unpacked from another ``.xz``. Returns whether it unpacked."""
    xz = packed(db)
    if not xz.is_file():
        return False
    digest = _sha256(xz)
    stamp = _stamp(db)
    if db.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return False

    def decompress(out) -> None:
        with lzma.open(xz, "rb") as src:
            for block in iter(lambda: src.read(CHUNK), b""):
                out.write(block)

    try:
        _write_atomically(db, decompress)
    except (lzma.LZMAError, EOFError) as e:  # the working copy, if any, is left as it was
        from study.config import ConfigError

        raise ConfigError(f"{xz}: not a whole xz file ({e}); restore it: git checkout -- {xz}") from None
    _write_atomically(stamp, lambda out: out.write(f"{digest}\n".encode()))
    return True


def pack(db: Path) -> Path:
    """Write ``db``'s ``.xz`` (deterministic bytes) and mark ``db`` as its working copy; returns the
    ``.xz``."""
    xz = packed(db)
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=PRESET)

    def compress(out) -> None:
        with db.open("rb") as src:
            for block in iter(lambda: src.read(CHUNK), b""):
                out.write(compressor.compress(block))
        out.write(compressor.flush())

    _write_atomically(xz, compress)
    _write_atomically(_stamp(db), lambda out: out.write(f"{_sha256(xz)}\n".encode()))
    return xz


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URI (``sqlite+DRIVER:///`` too, a ``?query`` dropped; relative to
    the working directory), else None."""
    if ":///" not in uri or uri.split(":", 1)[0].split("+", 1)[0] != "sqlite":
        return None
    path = uri.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def unpack_for(uri: str) -> bool:
    """Unpack the committed store a tracking URI names, if it names one (see :func:`unpack`)."""
    path = sqlite_path(uri)
    return unpack(path) if path is not None and path.parent.is_dir() else False
