"""`hfemb serve` on the tiny Qwen3: OpenAI response shape, values equal to local `encode`, every bad request's error."""

from __future__ import annotations

import base64
import http.client
import json
import threading

import numpy as np
import pytest

from hfemb.modeling.loading import load_embedding_model
from hfemb.publishing.serve import EmbeddingService, make_server

TEXTS = ["What helps with a dry cough?", "多喝温水，注意休息。", "a"]


@pytest.fixture(scope="module")
def local_model(tiny_qwen3):
    return load_embedding_model(tiny_qwen3)


@pytest.fixture(scope="module")
def server(tiny_qwen3):
    service = EmbeddingService(load_embedding_model(tiny_qwen3), model_name="tiny", max_batch=4)
    srv = make_server(service, "127.0.0.1", 0, max_request_bytes=4096)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(server, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def test_embeddings_float_and_base64_equal_local_encode(server, local_model):
    status, reply = request(server, "POST", "/v1/embeddings", {"model": "tiny", "input": TEXTS})
    assert status == 200 and reply["object"] == "list" and reply["model"] == "tiny"
    assert [d["index"] for d in reply["data"]] == [0, 1, 2] and reply["data"][0]["object"] == "embedding"
    got = np.array([d["embedding"] for d in reply["data"]], dtype=np.float32)
    # no input_type: texts are embedded as sent (no prompt) - the document side of the tiny model
    assert local_model.document_prompt == ""
    expected = local_model.encode(TEXTS, is_query=False)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    ids = local_model.token_ids(TEXTS, is_query=False, max_length=512)
    assert reply["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}

    status, reply = request(server, "POST", "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"})
    assert status == 200
    vec = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, expected[0], atol=1e-5)


def test_input_type_adds_the_model_prompt(server, local_model):
    status, reply = request(server, "POST", "/embeddings", {"input": TEXTS, "input_type": "query"})
    assert status == 200
    got = np.array([d["embedding"] for d in reply["data"]])
    np.testing.assert_allclose(got, local_model.encode(TEXTS, is_query=True), atol=1e-5)
    assert local_model.query_prompt.startswith("Instruct: ")
    prompted = [local_model.query_prompt + t for t in TEXTS]
    _, raw = request(server, "POST", "/v1/embeddings", {"input": prompted})  # = the client adding the prompt
    np.testing.assert_allclose(np.array([d["embedding"] for d in raw["data"]]), got, atol=1e-5)


def test_dimensions_truncate_and_renormalise(server, local_model):
    status, reply = request(server, "POST", "/v1/embeddings", {"input": TEXTS, "dimensions": 16})
    assert status == 200
    got = np.array([d["embedding"] for d in reply["data"]])
    full = local_model.encode(TEXTS, is_query=False)[:, :16]
    np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_models_and_health(server):
    assert request(server, "GET", "/health") == (200, {"status": "ok", "model": "tiny"})
    status, reply = request(server, "GET", "/v1/models")
    assert status == 200 and reply["data"][0]["id"] == "tiny" and reply["data"][0]["object"] == "model"


@pytest.mark.parametrize("body, status, message", [
    ({"input": [1, 2, 3]}, 400, "token ids are not supported"),
    ({"input": [[1, 2]]}, 400, "token ids are not supported"),
    ({"input": []}, 400, "non-empty list"),
    ({"input": None}, 400, "'input' must be"),
    ({"input": ["a"] * 5}, 400, "at most 4"),
    ({"input": "a", "model": "other"}, 404, "not served here"),
    ({"input": "a", "dimensions": 65}, 400, "[1, 64]"),
    ({"input": "a", "dimensions": 0}, 400, "[1, 64]"),
    ({"input": "a", "dimensions": "8"}, 400, "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "a", "input_type": "passage"}, 400, "input_type"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests(server, body, status, message):
    got_status, reply = request(server, "POST", "/v1/embeddings", body)
    assert got_status == status
    assert message in reply["error"]["message"] and reply["error"]["type"]


def test_bad_json_size_and_routes(server):
    status, reply = request(server, "POST", "/v1/embeddings", raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = request(server, "POST", "/v1/embeddings", raw=json.dumps({"input": "x" * 5000}).encode())
    assert status == 413 and "exceeds 4096" in reply["error"]["message"]
    assert request(server, "POST", "/v1/chat/completions", {"input": "a"})[0] == 404
    assert request(server, "GET", "/nothing")[0] == 404
    # the server still answers after all of that
    assert request(server, "POST", "/v1/embeddings", {"input": "ok"})[0] == 200
