"""The OpenAI-compatible client against a real `hfemb serve` process (tiny Qwen3) and against a scripted stub
server for retries and error replies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from hfemb.errors import HfembError
from hfemb.evaluation.evaluate import evaluate
from hfemb.modeling.loading import load_embedding_model
from hfemb.evaluation.openai_client import (OpenAIEmbeddingClient, default_query_prompt, embeddings_url, openai_encoder,
                                 parse_openai_spec)

QUERIES = ["what helps a dry cough", "咳嗽怎么办"]
DOCS = ["Drink warm water and rest.", "多喝温水，注意休息。", "Stocks fell sharply today."]


@pytest.fixture(scope="module")
def served(tiny_qwen3):
    """`python -m hfemb serve TINY --port 0` in its own process; yields its base URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hfemb", "serve", tiny_qwen3, "--port", "0",
                             "--served-model-name", "tiny-qwen3"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("serving"):
                break
        match = re.search(r"http://[\d.]+:\d+", line)
        assert match, f"server did not start: {line!r}"
        yield match.group(0) + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local(tiny_qwen3):
    return load_embedding_model(tiny_qwen3)


def test_spec_url_and_prompt():
    assert parse_openai_spec("openai:Qwen/Qwen3-Embedding-8B@http://gpu:8000/v1") == (
        "Qwen/Qwen3-Embedding-8B", "http://gpu:8000/v1")
    for bad in ("openai:model", "openai:@http://h/v1", "openai:m@ftp://h", "Qwen/Qwen3-Embedding-8B"):
        with pytest.raises(HfembError, match="openai:MODEL@BASE_URL"):
            parse_openai_spec(bad)
    assert embeddings_url("http://h:8000/v1/") == "http://h:8000/v1/embeddings"
    assert embeddings_url("http://h:8000") == "http://h:8000/v1/embeddings"
    assert embeddings_url("https://api.x.com/v1/embeddings") == "https://api.x.com/v1/embeddings"
    assert default_query_prompt("Qwen/Qwen3-Embedding-8B") == (
        "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:")
    assert default_query_prompt("BAAI/bge-m3") == "" and default_query_prompt("Qwen/Qwen3-Embedding-8B", False) == ""
    assert default_query_prompt("bge", "Find duplicates") == "Instruct: Find duplicates\nQuery:"


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_encoder_against_hfemb_serve_equals_local_encode(served, local, encoding_format):
    prompt = local.query_prompt
    assert prompt.startswith("Instruct: ")
    encoder = openai_encoder(f"openai:tiny-qwen3@{served}", instruction=prompt[len("Instruct: "):-len("\nQuery:")],
                             batch_size=2, encoding_format=encoding_format)  # batches of 2 -> several requests
    assert encoder.query_prompt == prompt and encoder.document_prompt == ""
    np.testing.assert_allclose(encoder.encode(QUERIES, is_query=True), local.encode(QUERIES, is_query=True), atol=1e-5)
    np.testing.assert_allclose(encoder.encode(DOCS, is_query=False), local.encode(DOCS, is_query=False), atol=1e-5)


def test_evaluate_through_endpoint_equals_local(served, tiny_qwen3, tmp_path, monkeypatch):
    rows = [{"query": q, "documents": [{"content": d, "label": int(i == j)} for j, d in enumerate(DOCS)]}
            for i, q in enumerate(QUERIES)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    monkeypatch.setenv("HFEMB_TEST_KEY", "sk-do-not-write-me")
    kw = dict(thresholds="-0.5:0.9", cache_dir=str(tmp_path / "cache"), print_table=False, show_progress=False,
              n_bootstrap=20, api_key_env="HFEMB_TEST_KEY", instruction="Find answers to medical questions")
    report = evaluate({"local": tiny_qwen3, "api": f"openai:tiny-qwen3@{served}"}, data, output_dir=tmp_path / "o",
                      **kw)
    local_res, api_res = report["models"]["local"], report["models"]["api"]
    assert api_res["query_prompt"] == local_res["query_prompt"] == "Instruct: Find answers to medical questions\nQuery:"
    for a, b in zip(local_res["sweep"], api_res["sweep"]):
        assert a["f1"] == b["f1"] and a["precision"] == b["precision"]
    assert api_res["roc_auc"] == pytest.approx(local_res["roc_auc"]) and api_res["texts_encoded"] == 5
    # the endpoint's vectors are cached like a local model's
    again = evaluate({"api": f"openai:tiny-qwen3@{served}"}, data, output_dir=tmp_path / "o2", **kw)
    assert again["models"]["api"]["texts_encoded"] == 0
    for path in (tmp_path / "o").iterdir():
        if path.suffix in (".json", ".md", ".csv"):
            assert "sk-do-not-write-me" not in path.read_text()


# ------------------------------------------------------------------------------------- stub server
class Stub:
    """A scripted HTTP server: each POST pops the next (status, body bytes, headers) reply."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, payload, headers = stub.replies.pop(0)
                if callable(payload):
                    payload = payload(body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _ok(body):
    data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(body["input"])]
    return json.dumps({"object": "list", "data": data[::-1]}).encode()  # out of order on purpose


@pytest.fixture()
def stub():
    made = []

    def make(*replies):
        made.append(Stub(replies))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_retries_with_backoff_then_succeeds_and_sends_the_key(stub):
    s = stub((503, b"busy", {}), (429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"}), (200, _ok, {}))
    client = OpenAIEmbeddingClient("m", s.url, api_key="sk-secret", backoff=0.01)
    vectors = client.embed(["ab", "abcd"])
    np.testing.assert_array_equal(vectors, [[2, 1], [4, 1]])  # reordered by index
    assert len(s.requests) == 3 and s.requests[0]["path"] == "/v1/embeddings"
    assert s.requests[0]["auth"] == "Bearer sk-secret" and s.requests[0]["body"]["model"] == "m"
    assert "sk-secret" not in repr(client)


def test_batches_and_normalises(stub):
    s = stub((200, _ok, {}), (200, _ok, {}))
    encoder = openai_encoder(f"openai:m@{s.url}", batch_size=2, max_retries=0)
    vectors = encoder.encode(["a", "bb", "ccc"], is_query=True)
    assert [len(r["body"]["input"]) for r in s.requests] == [2, 1]
    np.testing.assert_allclose(vectors, np.array([[1, 1], [2, 1], [3, 1]]) / np.sqrt([[2], [5], [10]]))
    assert s.requests[0]["auth"] is None  # no key in the environment -> no header


@pytest.mark.parametrize("reply, message", [
    ((400, b'{"error": {"message": "input too long", "type": "invalid_request_error"}}', {}), "HTTP 400: input too long"),
    ((401, b'{"error": {"message": "bad key"}}', {}), "HTTP 401: bad key"),
    ((200, b"<html>proxy page</html>", {}), "reply is not JSON"),
    ((200, b'{"object": "list"}', {}), "expected 'data' with 2 embeddings"),
    ((200, b'{"data": [{"index": 0, "embedding": [1.0]}]}', {}), "expected 'data' with 2 embeddings"),
    ((200, b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]}', {}), "malformed item 1"),
    ((200, b'{"data": [{"index": 0, "embedding": ["x"]}, {"index": 1, "embedding": [2.0]}]}', {}), "not a vector"),
    ((200, b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [2.0, 3.0]}]}', {}), "different sizes"),
    ((200, b'{"data": [{"index": 0, "embedding": "@@"}, {"index": 1, "embedding": "@@"}]}', {}), "not a vector"),
])
def test_error_replies(stub, reply, message):
    s = stub(reply)
    with pytest.raises(HfembError, match=re.escape(message)):
        OpenAIEmbeddingClient("m", s.url, max_retries=0).embed(["a", "b"])


def test_persistent_failures_and_connection_errors(stub):
    s = stub(*[(500, b'{"error": {"message": "boom"}}', {})] * 3)
    with pytest.raises(HfembError, match=r"failed after 3 attempts: HTTP 500: boom"):
        OpenAIEmbeddingClient("m", s.url, max_retries=2, backoff=0.001).embed(["a"])
    assert len(s.requests) == 3
    closed = Stub([])
    url = closed.url
    closed.close()
    with pytest.raises(HfembError, match="failed after 2 attempts: cannot connect"):
        OpenAIEmbeddingClient("m", url, max_retries=1, backoff=0.001, timeout=5).embed(["a"])
