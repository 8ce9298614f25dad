"""Files and folders: atomic writes (nothing half-written: write to a temporary file or folder beside the target,
then rename), hfemb's cache root, output checks made before any work (an output must not be an input, its
folder must be writable), and SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hfemb.errors import ConfigError, HfembError

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})


def cache_root() -> Path:
    """hfemb's cache folder: ``$HFEMB_CACHE`` if set, else ``~/.cache/hfemb`` (token cache, embedding cache,
    the tiny test model each live in a subfolder)."""
    return Path(os.environ.get("HFEMB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hfemb"))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error (or Ctrl-C / SIGTERM)
    it is removed and ``path`` is left as it was. A failed write (disk full, file-size limit, read-only
    file system) raises `HfembError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise HfembError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise HfembError(f"{path}: cannot write: {exc.strerror} (nothing written; an existing {path.name} "
                             "is unchanged)") from None
        raise


def read_json(path: str | os.PathLike):
    """The JSON content of ``path``; None when it does not exist (`HfembError` when it cannot be read)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HfembError(f"{path}: cannot read JSON: {exc}") from None


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


# ---- output checks, made before loading models or mining ------------------------------------------
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file: `os.path.samefile` when both exist (so symlinks, hard
    links and ``./x`` vs ``x`` all count), else the fully resolved paths are compared."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_folder_writable(folder: Path, what: str) -> None:
    """``folder`` (which may not exist yet) can be created and written."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, where a folder is expected")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: folder {existing} is not writable")


def check_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), option: str = "--output",
                 folder: bool = False, files: Iterable[str] = ()) -> None:
    """The one check every command makes on what it will write, before any work: raises `ConfigError`
    (one line naming ``option``) when

    * the output is one of ``inputs`` (compared with `same_file`: symlinks and hard links to an input count),
      so an input is never overwritten;
    * ``folder=False``: ``path`` is an existing folder, or its folder cannot be created or written;
    * ``folder=True``: ``path`` is an existing file, or cannot be created or written; ``files`` are the names
      written inside it, each also checked against ``inputs``.
    """
    target = Path(path)
    inputs = [Path(p) for p in inputs if p]
    written = [target / name for name in files] if folder else [target]
    for out in written:
        for inp in inputs:
            if same_file(out, inp):
                raise ConfigError(f"{option} {out} is the input {inp} (same file): writing it would destroy the "
                                  "input; choose another output")
    if folder:
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{option} {target}: is a file, where a folder is expected")
        _check_folder_writable(target, f"{option} {target}")
        for out in written:
            if out.is_dir():
                raise ConfigError(f"{option}: {out} is a folder, where a file is to be written")
    else:
        if target.is_dir():
            raise ConfigError(f"{option} {target}: is a folder, where a file is to be written")
        _check_folder_writable(target.parent, f"{option} {target}")


# ---- SIGTERM ----------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (what job schedulers send), so every clean-up that runs on Ctrl-C
    (temporary files removed, the old output left as it was) also runs on SIGTERM."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_FORK_HOOK = []


def handle_sigterm() -> None:
    """Turn SIGTERM into `Terminated` (a `KeyboardInterrupt`) in the main thread; no-op elsewhere. Forked
    children (jieba and DataLoader workers) get the default back: they just end, with no traceback."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _raise_terminated)
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_default_sigterm)
            _FORK_HOOK.append(True)
