"""`hfemb serve` under bad clients (issue 17): deep nesting -> 400, oversized bodies -> a 413 that
http.client receives, stalled clients time out and are capped, hang-ups leave no traceback, port errors
before loading the model."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time

import pytest

from hfemb.cli import main
from hfemb.errors import ConfigError
from hfemb.modeling.loading import load_embedding_model
from hfemb.publishing.serve import EmbeddingService, check_port, make_server


@pytest.fixture(scope="module")
def service(tiny_qwen3):
    return EmbeddingService(load_embedding_model(tiny_qwen3), model_name="tiny", max_batch=8)


def _serve(service, read_timeout):
    srv = make_server(service, "127.0.0.1", 0, max_request_bytes=65536, read_timeout=read_timeout, max_connections=4)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def server(service):
    srv = _serve(service, 0.5)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def slow_server(service):
    srv = _serve(service, 2.0)  # long enough for the test to open all its connections first
    yield srv
    srv.shutdown()
    srv.server_close()


def post(server, raw: bytes, timeout=30):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    conn.request("POST", "/v1/embeddings", body=raw, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    conn.close()
    return response.status, reply


def test_deeply_nested_json_is_a_400(server):
    status, reply = post(server, b'{"input": ' + b"[" * 20000 + b"]" * 20000 + b"}")
    assert status == 400 and "nested too deeply" in reply["error"]["message"]
    assert post(server, b'{"input": "still fine"}')[0] == 200


def test_oversized_body_gets_a_clean_413_in_http_client(server):
    """http.client sends the whole body before it reads the answer; 4 MB is far over the socket buffers, so a
    server that answers without reading would reset the connection (ConnectionResetError / BrokenPipeError)."""
    status, reply = post(server, json.dumps({"input": "x" * (4 << 20)}).encode())
    assert status == 413 and "exceeds 65536" in reply["error"]["message"]
    assert post(server, b'{"input": "ok"}')[0] == 200


def test_expect_100_continue_is_refused_before_the_body(server):
    sock = socket.create_connection(server.server_address[:2], timeout=5)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    head = sock.recv(65536).decode()
    sock.close()
    assert head.startswith("HTTP/1.1 413") and "100 Continue" not in head


def test_stalled_clients_time_out_and_are_capped(slow_server):
    server = slow_server
    base = threading.active_count()
    stalled = []
    for _ in range(10):  # each declares a body and never sends it
        sock = socket.create_connection(server.server_address[:2], timeout=5)
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        stalled.append(sock)
    time.sleep(0.2)
    assert threading.active_count() - base <= 4  # the cap: at most 4 handler threads
    answers = []
    for sock in stalled:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        answers.append(data.split(b" ", 2)[1].decode())
        sock.close()
    assert answers == ["408"] * 4 + ["503"] * 6
    time.sleep(0.3)
    assert threading.active_count() <= base  # every handler thread has finished
    assert post(server, b'{"input": "ok"}')[0] == 200


def test_client_that_hangs_up_leaves_no_traceback(server, capsys):
    for _ in range(5):
        sock = socket.create_connection(server.server_address[:2], timeout=5)
        body = json.dumps({"input": ["a fairly long text to embed"] * 8}).encode()
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.close()
    time.sleep(1.0)
    assert post(server, b'{"input": "ok"}')[0] == 200
    err = capsys.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err


def test_port_in_use_or_out_of_range_is_one_line_before_loading(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    with pytest.raises(ConfigError, match="already in use"):
        check_port("127.0.0.1", port)
    missing = str(tmp_path / "no-model")  # loading it would fail with another message
    assert main(["serve", missing, "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"cannot listen on 127.0.0.1:{port}: already in use")
    taken.close()
    assert main(["serve", missing, "--port", "70000"]) == 2
    assert "--port 70000: out of range" in capsys.readouterr().err
