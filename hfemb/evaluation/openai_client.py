"""Client for OpenAI-compatible ``/v1/embeddings`` endpoints (vLLM, TEI, ``hfemb serve``, OpenAI).

Used by evaluation for model specs ``openai:MODEL@BASE_URL`` (e.g.
``openai:Qwen/Qwen3-Embedding-8B@http://gpu-box:8000/v1``). Standard library only (``urllib``).

* The prompt is applied client-side: the text sent already carries the query instruction (as vLLM and
  TEI expect), so the server must not add one. Defaults follow local models: Qwen3-Embedding's
  web-search instruction for model names containing "Qwen3-Embedding", none otherwise.
* The API key is read from an environment variable (``OPENAI_API_KEY`` unless told otherwise) and is
  never logged, printed or written.
* Requests are batched; 429, 5xx, timeouts and connection errors are retried with exponential backoff
  (``Retry-After`` honoured); other 4xx replies, non-JSON replies and replies of the wrong shape raise
  ``HfembError``. Returned vectors are L2-normalised here (cosine similarity), whatever the server does.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from hfemb.errors import HfembError

SPEC_PREFIX = "openai:"
QWEN3_WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"  # = modeling
_SPEC_RE = re.compile(r"^openai:(?P<model>[^@]+)@(?P<url>https?://\S+)$")
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def is_openai_spec(spec: str) -> bool:
    return str(spec).startswith(SPEC_PREFIX)


def parse_openai_spec(spec: str) -> tuple[str, str]:
    """``openai:MODEL@BASE_URL`` -> (MODEL, BASE_URL); a clear error otherwise."""
    match = _SPEC_RE.match(str(spec).strip())
    if not match:
        raise HfembError(f"model {spec!r}: expected openai:MODEL@BASE_URL, e.g. "
                         "openai:Qwen/Qwen3-Embedding-8B@http://localhost:8000/v1")
    return match["model"], match["url"]


def embeddings_url(base_url: str) -> str:
    """``http://h:8000/v1`` -> ``http://h:8000/v1/embeddings``; a bare host gets ``/v1`` first."""
    url = base_url.rstrip("/")
    if url.endswith("/embeddings"):
        return url
    if urllib.parse.urlparse(url).path in ("", "/"):
        url += "/v1"
    return url + "/embeddings"


def default_query_prompt(model: str, instruction: str | bool | None = None) -> str:
    """The query prefix the client sends: like ``load_embedding_model``'s ``query_instruction``."""
    if instruction is False or instruction == "":
        return ""
    if isinstance(instruction, str):
        return f"Instruct: {instruction}\nQuery:"
    return f"Instruct: {QWEN3_WEB_SEARCH_TASK}\nQuery:" if "qwen3-embedding" in model.lower() else ""


class OpenAIEmbeddingClient:
    """Sends texts as they are to ``POST {base_url}/embeddings`` and returns float32 vectors."""

    def __init__(self, model: str, base_url: str, *, api_key: str | None = None, batch_size: int = 64,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 120.0, dimensions: int | None = None,
                 encoding_format: str = "float"):
        if encoding_format not in ("float", "base64"):
            raise HfembError(f"encoding_format must be 'float' or 'base64', not {encoding_format!r}")
        if batch_size < 1:
            raise HfembError(f"batch_size must be >= 1, not {batch_size}")
        self.model, self.url = model, embeddings_url(base_url)
        self._api_key = api_key
        self.batch_size, self.max_retries, self.backoff, self.timeout = batch_size, max_retries, backoff, timeout
        self.dimensions, self.encoding_format = dimensions, encoding_format

    def __repr__(self) -> str:  # no key
        return f"OpenAIEmbeddingClient(model={self.model!r}, url={self.url!r})"

    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        """``[len(texts), dim]`` float32, in input order (not normalised)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = list(texts[i:i + self.batch_size])
            out.append(self._embed_batch(batch))
            if progress is not None:
                progress.update(len(batch))
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        dims = {a.shape[1] for a in out}
        if len(dims) != 1:
            raise HfembError(f"{self.url}: embeddings of different sizes across batches {sorted(dims)}")
        return np.concatenate(out)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        payload = {"model": self.model, "input": texts, "encoding_format": self.encoding_format}
        if self.dimensions:
            payload["dimensions"] = int(self.dimensions)
        reply = self._post(payload)
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            got = f"{len(data)} items" if isinstance(data, list) else f"no 'data' list (keys: {_keys(reply)})"
            raise HfembError(f"{self.url}: expected 'data' with {len(texts)} embeddings, got {got}")
        rows: list = [None] * len(texts)
        for pos, item in enumerate(data):
            index = item.get("index", pos) if isinstance(item, dict) else None
            vec = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(texts) or rows[index] is not None or vec is None:
                raise HfembError(f"{self.url}: malformed item {pos} in 'data' (need a unique 'index' and 'embedding')")
            try:
                if isinstance(vec, str):
                    arr = np.frombuffer(base64.b64decode(vec, validate=True), dtype="<f4")
                else:
                    arr = np.asarray(vec, dtype=np.float32)
            except (ValueError, TypeError) as exc:
                raise HfembError(f"{self.url}: item {pos}: 'embedding' is not a vector of numbers ({exc})") from None
            if arr.ndim != 1 or arr.size == 0:
                raise HfembError(f"{self.url}: item {pos}: 'embedding' is not a non-empty vector")
            rows[index] = arr.astype(np.float32)
        if len({r.size for r in rows}) != 1:
            raise HfembError(f"{self.url}: embeddings of different sizes in one reply")
        return np.stack(rows)

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            delay = min(self.backoff * 2 ** attempt, 60.0)
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                    status = response.status
            except urllib.error.HTTPError as exc:
                raw, status = exc.read(), exc.code
                message = _error_message(raw)
                if status not in _RETRY_STATUS:
                    raise HfembError(f"{self.url}: HTTP {status}: {message}") from None
                last = f"HTTP {status}: {message}"
                if attempt < self.max_retries:
                    time.sleep(_retry_after(exc.headers, delay))
                    continue
                break
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"cannot connect: {reason}"
                if attempt < self.max_retries:
                    time.sleep(delay)
                    continue
                break
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                snippet = raw[:200].decode("utf-8", "replace")
                raise HfembError(f"{self.url}: HTTP {status}: reply is not JSON: {snippet!r}") from None
        raise HfembError(f"{self.url}: failed after {self.max_retries + 1} attempts: {last}")


def _keys(obj) -> str:
    return ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw.decode("utf-8"))
        if isinstance(err, dict):
            inner = err.get("error", err)
            if isinstance(inner, dict):
                return str(inner.get("message") or inner)
            return str(err.get("message") or inner)
    except (UnicodeDecodeError, ValueError):
        pass
    return raw[:200].decode("utf-8", "replace") or "(empty reply)"


def _retry_after(headers, default: float) -> float:
    try:
        return min(float(headers.get("Retry-After")), 60.0)
    except (TypeError, ValueError):
        return default


class OpenAIEncoder:
    """Gives an endpoint the ``encode(texts, is_query=...)`` of a local model (prompts added client-side)."""

    def __init__(self, client: OpenAIEmbeddingClient, *, query_prompt: str = "", document_prompt: str = ""):
        self.client, self.query_prompt, self.document_prompt = client, query_prompt, document_prompt

    def encode(self, texts, *, is_query: bool, show_progress: bool = False, **_ignored) -> np.ndarray:
        prompt = self.query_prompt if is_query else self.document_prompt
        vectors = self.client.embed([prompt + t for t in texts])
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)


def openai_encoder(spec: str, *, instruction: str | bool | None = None, symmetric: bool = False,
                   api_key_env: str = "OPENAI_API_KEY", **client_options) -> OpenAIEncoder:
    """An ``OpenAIEncoder`` for ``openai:MODEL@BASE_URL``; the key comes from ``$api_key_env`` (may be unset)."""
    model, base_url = parse_openai_spec(spec)
    client = OpenAIEmbeddingClient(model, base_url, api_key=os.environ.get(api_key_env) or None, **client_options)
    query_prompt = default_query_prompt(model, instruction)
    return OpenAIEncoder(client, query_prompt=query_prompt, document_prompt=query_prompt if symmetric else "")
