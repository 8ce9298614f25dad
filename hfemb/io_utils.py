"""Files and folders: atomic writes (nothing half-written: write to a temporary file or folder beside the target,
then rename) and hfemb's cache root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


def cache_root() -> Path:
    """hfemb's cache folder: ``$HFEMB_CACHE`` if set, else ``~/.cache/hfemb`` (token cache, embedding cache,
    the tiny test model each live in a subfolder)."""
    return Path(os.environ.get("HFEMB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hfemb"))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False))
            fh.write("\n")
            n += 1
    return n


@contextlib.contextmanager
def temporary_folder_beside(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder next to ``target`` (same filesystem, so renaming it or its files is atomic);
    removed on exit unless it was moved away."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_atomically(write: Callable[[str], None], target: str | os.PathLike) -> Path:
    """Call ``write(tmp_dir)`` and move the finished folder to ``target`` (replacing it); on error the
    target is left as it was."""
    target = Path(target)
    with temporary_folder_beside(target) as tmp:
        write(str(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        os.chmod(target, 0o755)  # mkdtemp made it 0700
    return target
