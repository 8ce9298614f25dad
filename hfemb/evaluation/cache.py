"""On-disk embedding cache for evaluation: a re-run with other thresholds encodes nothing.

One SQLite file per model fingerprint under the cache folder (``--cache-dir``, else ``$HFEMB_CACHE/embeddings``,
else ``~/.cache/hfemb/embeddings``). A vector is keyed by (prompt, sha1 of the text). The fingerprint
covers what changes vectors: the resolved model location and its files (name, size, mtime) or Hub
commit, an adapter's base model, dtype, device type, pooling, truncate_dim, max_length, quantization
(or, for an OpenAI-compatible endpoint, its URL, model name and dimensions). The resolved prompts of a
(model, prompt request) pair are remembered too, so a fully cached model is not even loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from hfemb.io_utils import cache_root

_SQL_CHUNK = 500


def default_cache_dir() -> Path:
    """``$HFEMB_CACHE/embeddings`` if set, else ``~/.cache/hfemb/embeddings``."""
    return cache_root() / "embeddings"


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _folder_files(folder: Path) -> list[list]:
    """(relative name, size, mtime_ns) of every file in a model folder (hidden files skipped)."""
    rows = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = path.stat()
            rows.append([rel.as_posix(), st.st_size, st.st_mtime_ns])
    return rows


def model_location_fingerprint(name_or_path: str, _depth: int = 0) -> dict:
    """Where a local model / adapter / Hub id lives and which files it has, without loading it."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        info: dict = {"path": str(path.resolve()), "files": _folder_files(path)}
        adapter_config = path / "adapter_config.json"
        if adapter_config.is_file() and _depth < 2:
            try:
                base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError):
                base = None
            if base:
                info["base"] = model_location_fingerprint(str(base), _depth + 1)
        return info
    try:  # a Hub id: the cached snapshot's commit (unknown when not cached -> loading will say so)
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(str(name_or_path), local_files_only=True))
        return {"hub_id": str(name_or_path), "commit": snapshot.name, "files": _folder_files(snapshot)}
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id
        return {"hub_id": str(name_or_path), "commit": None}


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Vectors of one model (fingerprint) in ``<cache_dir>/<key>.sqlite``; float32, any dimension."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: dict):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = fingerprint_key(fingerprint)
        self.path = self.dir / f"{self.key}.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.executescript(
            # a rowid table: vectors are appended, only the small (prompt, text hash) index takes random inserts
            # (a WITHOUT ROWID table keyed by the hash moved whole 1-16 KB rows around: 4x slower writes at 100k
            # vectors, twice the file size). Files made before keep their table; the statements work on both.
            "CREATE TABLE IF NOT EXISTS vectors (prompt TEXT, text TEXT, vec BLOB, UNIQUE (prompt, text));"
            "CREATE TABLE IF NOT EXISTS prompts (request TEXT PRIMARY KEY, value TEXT);"
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);"
        )
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)",
                         (json.dumps(fingerprint, sort_keys=True, ensure_ascii=False),))
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # resolved prompts of a prompt request (e.g. {"instruction": None, "symmetric": False})
    def get_prompts(self, request: dict) -> dict | None:
        row = self._db.execute("SELECT value FROM prompts WHERE request = ?",
                               (json.dumps(request, sort_keys=True),)).fetchone()
        return json.loads(row[0]) if row else None

    def put_prompts(self, request: dict, prompts: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO prompts VALUES (?, ?)",
                         (json.dumps(request, sort_keys=True), json.dumps(prompts, ensure_ascii=False)))
        self._db.commit()

    def get(self, prompt: str, texts: list[str]) -> dict[str, np.ndarray]:
        """{text: vector} for the texts found (with this prompt)."""
        prompt_key = sha1(prompt)
        by_hash = {sha1(t): t for t in texts}
        hashes = list(by_hash)
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(hashes), _SQL_CHUNK):
            part = hashes[i:i + _SQL_CHUNK]
            rows = self._db.execute(
                f"SELECT text, vec FROM vectors WHERE prompt = ? AND text IN ({','.join('?' * len(part))})",
                [prompt_key, *part],
            ).fetchall()
            for text_hash, blob in rows:
                found[by_hash[text_hash]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, prompt: str, texts: list[str], vectors: np.ndarray) -> None:
        prompt_key = sha1(prompt)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                             [(prompt_key, sha1(t), v.tobytes()) for t, v in zip(texts, vectors)])
        self._db.commit()
