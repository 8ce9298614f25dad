"""``hfemb serve``: an OpenAI-compatible embeddings endpoint (standard library ``http.server`` only).

Routes: ``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models``, ``GET /health``.

Request: ``{"input": str | [str, ...], "model"?, "dimensions"?, "encoding_format"?: "float" | "base64",
"input_type"?: "query" | "document"}``. Token-id inputs are rejected (400). ``dimensions`` truncates
(Matryoshka) and re-normalises; more than the model's dimension is a 400. ``base64`` is little-endian
float32, as OpenAI sends it.

Prompts: like vLLM and TEI, the server embeds the text it is sent **as is**: clients add the query
instruction themselves (``hfemb eval`` with ``openai:MODEL@URL`` does). The optional, non-OpenAI
``"input_type"`` field asks the server to add the model's own prompt instead: ``"query"`` gets the
query prompt, ``"document"`` the document prompt (the query prompt too with ``--symmetric``).

Errors are ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status; bodies larger than
``max_request_bytes`` get 413 (the body is then read and discarded up to a bound, so that clients that send it
all before reading, like Python's ``http.client``, receive the 413 rather than a reset). Requests are served one
model call at a time.

Bad clients: a client that stalls longer than ``read_timeout`` seconds (e.g. declares a body and never sends
it) gets 408 and is disconnected; at most ``max_connections`` connections are served at once (more get 503
with ``Retry-After``); bodies nested too deeply get 400; a client that hangs up early is only logged with
``verbose``, never with a traceback.
"""

from __future__ import annotations

import base64
import errno
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0  # seconds a client may stall while sending its request
DEFAULT_MAX_CONNECTIONS = 64
DISCARD_LIMIT = 64 * 1024 * 1024  # most bytes of an oversized body read (and dropped) before its 413 is final
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class EmbeddingService:
    """The model behind the endpoint: prompts taken off the model so texts are embedded as sent."""

    def __init__(self, model, *, model_name: str, max_batch: int = 256, max_length: int = 512, batch_size: int = 32,
                 max_tokens_per_batch: int | None = 16384):
        self.model, self.model_name = model, model_name
        self.prompts = {"query": model.query_prompt, "document": model.document_prompt}
        model.query_prompt = model.document_prompt = ""  # the server adds prompts itself, only on input_type
        self.max_batch, self.max_length = max_batch, max_length
        self.batch_size, self.max_tokens_per_batch = batch_size, max_tokens_per_batch
        self.dim = int(model.embedding_dim)
        self._lock = threading.Lock()
        self.created = int(time.time())

    def embeddings(self, body: dict) -> dict:
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise RequestError(400, "'input' must be a string or a non-empty list of strings")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                what = "token ids are not supported; send text" if isinstance(text, (int, list)) else "not a string"
                raise RequestError(400, f"'input'[{i}]: {what}")
        if len(texts) > self.max_batch:
            raise RequestError(400, f"'input' has {len(texts)} texts; at most {self.max_batch} per request")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                               "model_not_found")
        fmt = body.get("encoding_format", "float") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError(400, f"'encoding_format' must be 'float' or 'base64', not {fmt!r}")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= self.dim):
            raise RequestError(400, f"'dimensions' must be an integer in [1, {self.dim}], not {dims!r}")
        input_type = body.get("input_type")
        if input_type not in (None, "query", "document"):
            raise RequestError(400, f"'input_type' must be 'query' or 'document', not {input_type!r}")
        prefix = self.prompts[input_type] if input_type else ""
        texts = [prefix + t for t in texts] if prefix else texts

        with self._lock:
            tokens = sum(len(ids) for ids in self.model.token_ids(texts, is_query=False, max_length=self.max_length))
            vectors = self.model.encode(texts, is_query=False, batch_size=self.batch_size, max_length=self.max_length,
                                        max_tokens_per_batch=self.max_tokens_per_batch)
        vectors = np.asarray(vectors, dtype=np.float32)
        if dims is not None and dims < vectors.shape[1]:
            vectors = vectors[:, :dims]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        data = []
        for i, vec in enumerate(vectors):
            value = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "hfemb"}]}


def make_handler(service: EmbeddingService, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 verbose: bool = False, read_timeout: float | None = DEFAULT_READ_TIMEOUT):
    class Handler(BaseHTTPRequestHandler):
        server_version = "hfemb-serve"
        protocol_version = "HTTP/1.1"
        timeout = read_timeout  # socket timeout: a stalled client cannot hold its thread forever

        def log_message(self, format, *args):  # noqa: A002 - stdlib signature; no headers are logged
            if verbose:
                sys.stderr.write(f"{self.address_string()} - {format % args}\n")

        def _reply(self, status: int, obj: dict, headers: dict | None = None) -> None:
            payload = json.dumps(obj, ensure_ascii=False).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
            except CLIENT_GONE:  # the client hung up: nothing to answer, no traceback
                self.close_connection = True

        def _too_large(self, length: int) -> RequestError:
            self.close_connection = True
            return RequestError(413, f"request body of {length} bytes exceeds {max_request_bytes}")

        def _discard_body(self, length: int) -> None:
            """Read and drop up to DISCARD_LIMIT bytes of a refused body, so the client gets its answer
            instead of a reset; stops at the read timeout."""
            left = min(length, DISCARD_LIMIT)
            try:
                while left > 0:
                    chunk = self.rfile.read1(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            except (OSError, ValueError):
                pass

        def handle_expect_100(self):  # a client that asks first (curl) is refused before it sends the body
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_request_bytes:
                self._error(self._too_large(int(length)))
                return False
            return super().handle_expect_100()

        def _error(self, err: RequestError) -> None:
            self._reply(err.status, {"error": {"message": err.message, "type": err.kind, "code": err.status}})

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/health", "/v1/health"):
                self._reply(200, {"status": "ok", "model": service.model_name})
            elif path in ("/v1/models", "/models"):
                self._reply(200, service.models())
            else:
                self._error(RequestError(404, f"no route GET {path}", "not_found"))

        def do_POST(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            try:
                if path not in ("/v1/embeddings", "/embeddings"):
                    raise RequestError(404, f"no route POST {path}", "not_found")
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise RequestError(411, "a Content-Length header is required")
                if int(length) > max_request_bytes:
                    err = self._too_large(int(length))
                    self._error(err)  # answered first, then the rest of the body is drained
                    self._discard_body(int(length))
                    return
                raw = self.rfile.read(int(length))
                if len(raw) < int(length):
                    self.close_connection = True
                    raise RequestError(400, f"body ended after {len(raw)} of {length} bytes")
                try:
                    body = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise RequestError(400, f"body is not valid JSON: {exc}") from None
                except RecursionError:
                    raise RequestError(400, "body is not valid JSON: nested too deeply") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "body must be a JSON object")
                self._reply(200, service.embeddings(body))
            except RequestError as err:
                self._error(err)
            except TimeoutError:
                self.close_connection = True
                self._error(RequestError(408, f"no complete request body within {read_timeout} s", "timeout"))
            except CLIENT_GONE:
                self.close_connection = True
            except Exception as exc:  # noqa: BLE001 - one bad request must not kill the server
                self._error(RequestError(500, f"{type(exc).__name__}: {exc}", "server_error"))

    return Handler


class EmbeddingHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with a cap on concurrent connections (one thread each) and quiet handling of
    clients that disconnect or stall."""

    daemon_threads = True
    verbose = False

    def __init__(self, address, handler, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request) -> None:
        """503 to a connection over the cap, from the accepting thread: short timeout, never blocks for long."""
        payload = json.dumps({"error": {"message": f"server busy: {self.max_connections} connections already "
                                        "open; retry", "type": "server_busy", "code": 503}}).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                            + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, CLIENT_GONE + (socket.timeout,)):  # a client's doing, not the server's: no traceback
            if self.verbose:
                sys.stderr.write(f"{client_address[0]} - connection dropped: {type(exc).__name__}\n")
            return
        super().handle_error(request, client_address)


def make_server(service: EmbeddingService, host: str = "127.0.0.1", port: int = 8080, *,
                max_connections: int = DEFAULT_MAX_CONNECTIONS, **handler_options):
    """An `EmbeddingHTTPServer` (not started); ``port=0`` picks a free port (``server.server_address``).
    ``handler_options``: ``max_request_bytes``, ``read_timeout``, ``verbose`` (see `make_handler`)."""
    server = EmbeddingHTTPServer((host, port), make_handler(service, **handler_options),
                                 max_connections=max_connections)
    server.verbose = bool(handler_options.get("verbose"))
    return server


def check_port(host: str, port: int) -> None:
    """Raise `ConfigError` (one line) when ``port`` is out of range or ``host:port`` cannot be bound (in use,
    or a privileged port); made before loading the model."""
    from hfemb.errors import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: out of range (0-65535; 0 = any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server binds
        probe.bind(address)
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None
    finally:
        probe.close()
