"""Bounded load test of `hfemb serve` on 127.0.0.1: a burst of valid and invalid requests, a few concurrent.

    python bench/serve_load.py [--model PATH] [--requests 400] [--concurrency 8]

Starts `hfemb serve MODEL --port 0` (default: the tiny Qwen3) as a subprocess bound to 127.0.0.1 only,
sends REQUESTS requests from CONCURRENCY threads, cycling through the kinds below, and prints the count of
2xx/4xx/5xx/connection errors per kind, latency percentiles, and the server's RSS and thread count before and
after (ratio after/before). Exit status 1 if any 5xx or connection error occurred, or a kind got an
unexpected status. The burst is bounded (a fixed number of requests, at most CONCURRENCY at once); it is not
a throughput benchmark (2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, tiny_qwen3  # noqa: E402

HOST = "127.0.0.1"
MAX_BYTES = 256 * 1024
READ_TIMEOUT = 2.0


def _post(port: int, raw: bytes, path: str = "/v1/embeddings") -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _stalled(port: int) -> int:
    """Declares a 100-byte body and never sends it: the server must answer 408 after its read timeout."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def _hang_up(port: int) -> int:
    """Sends a valid request and resets the connection without reading: counted as 'sent' (0)."""
    import struct

    body = json.dumps({"input": ["a text the client will not wait for"] * 4}).encode()
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return 0


TEXTS = ["高血压患者日常饮食需要注意什么？", "What helps with a dry cough?", "多喝温水，注意休息。"]
KINDS = {  # name: (request, expected statuses)
    "valid_single": (lambda p: _post(p, json.dumps({"input": TEXTS[0]}).encode()), {200}),
    "valid_batch": (lambda p: _post(p, json.dumps({"input": TEXTS, "input_type": "query"}).encode()), {200}),
    "valid_base64": (lambda p: _post(p, json.dumps({"input": TEXTS[1], "encoding_format": "base64",
                                                    "dimensions": 8}).encode()), {200}),
    "health": (lambda p: _get(p, "/health"), {200}),
    "bad_json": (lambda p: _post(p, b"{not json"), {400}),
    "deep_nesting": (lambda p: _post(p, b'{"input": ' + b"[" * 50000 + b"]" * 50000 + b"}"), {400}),
    "token_ids": (lambda p: _post(p, json.dumps({"input": [[1, 2, 3]]}).encode()), {400}),
    "wrong_model": (lambda p: _post(p, json.dumps({"input": "a", "model": "other"}).encode()), {404}),
    "bad_route": (lambda p: _post(p, b"{}", "/v1/chat/completions"), {404}),
    "oversized": (lambda p: _post(p, json.dumps({"input": "x" * (2 * MAX_BYTES)}).encode()), {413}),
    "stalled_body": (_stalled, {408}),
    "hang_up": (_hang_up, {0}),
}
RARE = {"stalled_body": 40, "hang_up": 20}  # one in N requests (each stalled one waits READ_TIMEOUT)


def server_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, threads) of the server process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return rss, threads


def schedule(n: int) -> list[str]:
    common = [k for k in KINDS if k not in RARE]
    out = []
    for i in range(n):
        rare = next((k for k, every in RARE.items() if i % every == every - 1), None)
        out.append(rare or common[i % len(common)])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the tiny Qwen3)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    model = args.model or tiny_qwen3()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "hfemb", "serve", model, "--host", HOST, "--port", "0", "--device", "cpu",
         "--max-request-bytes", str(MAX_BYTES), "--read-timeout", str(READ_TIMEOUT), "--max-connections", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        match = re.search(r"http://[\d.]+:(\d+)/", line)
        if not match:
            print(f"server did not start: {line}{server.stderr.read()}", file=sys.stderr)
            return 1
        port = int(match.group(1))
        server.stdout.readline()
        assert _post(port, json.dumps({"input": "warm-up"}).encode()) == 200
        rss0, threads0 = server_stats(server.pid)

        results: dict[str, list[tuple[int | str, float]]] = defaultdict(list)
        lock = threading.Lock()

        def one(kind: str) -> None:
            start = time.perf_counter()
            try:
                status: int | str = KINDS[kind][0](port)
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
            with lock:
                results[kind].append((status, time.perf_counter() - start))

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, schedule(args.requests)))
        wall = time.perf_counter() - started
        time.sleep(READ_TIMEOUT + 0.5)  # let stalled connections end
        rss1, threads1 = server_stats(server.pid)
    finally:
        server.terminate()
        try:
            _, stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()

    classes: Counter = Counter()
    bad = 0
    print(f"{args.requests} requests, {args.concurrency} concurrent, {wall:.1f} s; model {model}")
    print(f"{'kind':14s} {'n':>4s}  statuses            p50 ms  p90 ms  p99 ms  max ms")
    for kind in KINDS:
        rows = results.get(kind, [])
        if not rows:
            continue
        statuses = Counter(s for s, _ in rows)
        ms = np.array([t for _, t in rows]) * 1000
        unexpected = sum(c for s, c in statuses.items() if s not in KINDS[kind][1])
        bad += unexpected
        for s, c in statuses.items():
            classes["error" if isinstance(s, str) else "sent" if s == 0 else f"{s // 100}xx"] += c
        print(f"{kind:14s} {len(rows):4d}  {dict(statuses)!s:18s} {np.percentile(ms, 50):7.1f} "
              f"{np.percentile(ms, 90):7.1f} {np.percentile(ms, 99):7.1f} {ms.max():7.1f}"
              + (f"  UNEXPECTED {unexpected}" if unexpected else ""))
    answered = [t for kind, rows in results.items() if kind not in RARE for _, t in rows]
    ms = np.array(answered) * 1000
    print(f"all answered requests but stalled/hang-up: p50 {np.percentile(ms, 50):.1f} ms, "
          f"p90 {np.percentile(ms, 90):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms")
    print("by class: " + ", ".join(f"{k} {classes[k]}" for k in ("2xx", "4xx", "5xx", "sent", "error")))
    print(f"server RSS {rss0:.0f} MiB -> {rss1:.0f} MiB (x{rss1 / rss0:.2f}); threads {threads0} -> {threads1}")
    tracebacks = stderr.count("Traceback")
    print(f"tracebacks in the server log: {tracebacks}")
    ok = classes["5xx"] == 0 and classes["error"] == 0 and bad == 0 and tracebacks == 0
    print("OK" if ok else "FAILED: 5xx, connection errors, unexpected statuses or tracebacks")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
