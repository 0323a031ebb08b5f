"""Reward server: remote scores equal local ones; a down, slow or garbling server raises RewardError."""

from __future__ import annotations

import http.client
import io
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from benchmarks.shapes.prompts import sample_prompts
from harness.types import Prompt, Reward, RewardError, RewardSpec
from rewards import server as server_module
from rewards.server import RemoteReward, decode_batch, encode_batch, make_server, reachable_url
from rewards.shapes import ShapesGenEval

SPEC = RewardSpec(name="fake", version="0", description="fake")


def start(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def shapes_server() -> Iterator[tuple[ShapesGenEval, str]]:
    reward = ShapesGenEval()
    server = make_server(reward, "127.0.0.1", 0)
    start(server)
    yield reward, server.url
    server.shutdown()
    server.server_close()


def shapes_batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, list[Prompt]]:
    prompts = [Prompt(md["prompt"], md) for md in sample_prompts(np.random.default_rng(seed), n)]
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), prompts


def test_remote_scores_equal_local_scores(shapes_server):
    local, url = shapes_server
    remote = RemoteReward(url, timeout=10, retries=0)
    assert isinstance(remote, Reward) and remote.spec == local.spec
    images, prompts = shapes_batch()
    # Rendered-looking images: draw a few solid squares so some clauses pass.
    images[:, :, 4:14, 4:14] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    expected = local(images, prompts)
    assert torch.equal(remote(images, prompts), expected)
    assert torch.equal(RemoteReward(url, spec=local.spec, dtype="uint8")(images, prompts), expected)


def test_request_round_trip_keeps_images_and_metadata():
    images, prompts = shapes_batch(3)
    decoded, back = decode_batch(encode_batch(images, prompts))
    assert torch.equal(decoded, images) and back == prompts
    with pytest.raises(ValueError, match="JSON-serialisable"):
        encode_batch(images[:1], [Prompt("x", {"bad": object()})])
    with pytest.raises(ValueError, match="not an npz"):
        decode_batch(b"garbage")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_down_server_raises_quickly():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\).*serve-reward"):
        RemoteReward(url, timeout=1, retries=2, backoff=0.01)
    remote = RemoteReward(url, timeout=1, retries=1, backoff=0.01, spec=SPEC)
    with pytest.raises(RewardError, match="failed after 2 attempt"):
        remote(*shapes_batch(2))
    assert time.monotonic() - started < 5


class Scripted(BaseHTTPRequestHandler):
    """Answers every request with the server's scripted (status, body, delay)."""

    def _reply(self) -> None:
        status, body, delay = self.server.script  # type: ignore[attr-defined]
        self.server.requests.append(self.command)  # type: ignore[attr-defined]
        if self.command == "POST":
            self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    server.requests = []  # type: ignore[attr-defined]
    start(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>oops</html>", "invalid JSON"),
        (b'{"reward": "fake", "scores": [0.5]}', r"shape \(1,\), expected \(2,\)"),
        (b'{"reward": "fake", "scores": [0.5, NaN]}', "invalid JSON"),
        (b'{"reward": "fake", "scores": [0.5, 1e999]}', "non-finite"),
        (b'{"reward": "fake", "scores": ["a", "b"]}', "list of numbers"),
        (b'{"reward": "other", "scores": [0.5, 0.5]}', "serves 'other', expected 'fake'"),
        (b"[1, 2]", "list of numbers"),
    ],
)
def test_garbage_answer_raises(scripted, body, match):
    scripted.script = (200, body, 0.0)  # type: ignore[attr-defined]
    remote = RemoteReward(f"http://127.0.0.1:{scripted.server_address[1]}", timeout=5, retries=0, spec=SPEC)
    with pytest.raises(RewardError, match=match):
        remote(*shapes_batch(2))


def test_malformed_spec_and_http_errors_raise(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    scripted.script = (200, b'{"name": "x"}', 0.0)  # type: ignore[attr-defined]
    with pytest.raises(RewardError, match="malformed spec"):
        RemoteReward(url, retries=0)
    scripted.script = (500, b'{"error": "scorer crashed"}', 0.0)  # type: ignore[attr-defined]
    with pytest.raises(RewardError, match="HTTP 500.*scorer crashed"):
        RemoteReward(url, retries=3, spec=SPEC)(*shapes_batch(2))


def test_a_slow_score_times_out_and_is_not_sent_again(scripted):
    """The server may still be scoring: a resend would queue a duplicate batch behind it."""
    scripted.script = (200, b'{"reward": "fake", "scores": [1, 1]}', 1.0)  # type: ignore[attr-defined]
    remote = RemoteReward(f"http://127.0.0.1:{scripted.server_address[1]}", timeout=0.2, retries=3, spec=SPEC)
    started = time.monotonic()
    with pytest.raises(RewardError, match="timed out after the request was sent.*not retried"):
        remote(*shapes_batch(2))
    assert time.monotonic() - started < 1.0
    time.sleep(1.2)  # let the scripted handler finish
    assert scripted.requests == ["POST"]  # type: ignore[attr-defined]


def test_one_refused_connection_is_retried_and_then_scores(shapes_server, monkeypatch):
    local, url = shapes_server
    connect = http.client.HTTPConnection.connect
    refused = []

    def flaky(self):
        if not refused:
            refused.append(1)
            raise ConnectionRefusedError("server restarting")
        connect(self)

    monkeypatch.setattr(http.client.HTTPConnection, "connect", flaky)
    remote = RemoteReward(url, timeout=10, connect_timeout=2, retries=1, backoff=0.01, spec=local.spec)
    images, prompts = shapes_batch()
    scores = remote(images, prompts)
    assert refused == [1] and torch.equal(scores, local(images, prompts))


class Exploding:
    spec = SPEC

    def __call__(self, images, prompts):
        raise RuntimeError("CUDA out of memory")


class NaNReward:
    spec = SPEC

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), float("nan"))


@pytest.mark.parametrize(("reward", "match"), [(Exploding(), "CUDA out of memory"), (NaNReward(), "non-finite")])
def test_server_reports_a_failing_reward(reward, match):
    server = make_server(reward, "127.0.0.1", 0)
    start(server)
    try:
        with pytest.raises(RewardError, match=f"HTTP 500.*{match}"):
            RemoteReward(server.url, timeout=5, retries=0)(*shapes_batch(2))
    finally:
        server.shutdown()
        server.server_close()


def test_server_rejects_a_bad_request(shapes_server):
    import urllib.error
    import urllib.request

    _, url = shapes_server
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url + "/score", data=b"not an npz", method="POST"), timeout=5)
    assert info.value.code == 400 and b"not an npz" in info.value.read()


def test_bad_content_length_is_a_400_and_the_client_raises(shapes_server, monkeypatch):
    _, url = shapes_server
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=5)
    connection.putrequest("POST", "/score")
    connection.putheader("Content-Length", "12abc")
    connection.endheaders(b"x" * 5)
    answer = connection.getresponse()
    assert answer.status == 400 and b"Content-Length must be" in answer.read()
    connection.close()
    # Through the client: a body the server refuses comes back as a RewardError naming HTTP 400.
    monkeypatch.setattr(server_module, "encode_batch", lambda images, prompts, dtype: compressed_npz(images))
    with pytest.raises(RewardError, match="HTTP 400.*compressed"):
        RemoteReward(url, timeout=5, retries=0)(*shapes_batch(2))


def compressed_npz(images) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.numpy(), prompts=np.frombuffer(b"[]", dtype=np.uint8))
    return buffer.getvalue()


def test_npz_bodies_that_would_expand_are_rejected():
    images, prompts = shapes_batch(2)
    with pytest.raises(ValueError, match="compressed"):
        decode_batch(compressed_npz(images))
    # An .npy header declaring 4e12 floats in a member of a few hundred bytes (numpy would allocate first).
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 1, 1)})
    member.write(b"\0" * 64)
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("images.npy", member.getvalue())
    with pytest.raises(ValueError, match=r"declares \(1000000000000, 3, 1, 1\)"):
        decode_batch(body.getvalue())
    assert torch.equal(decode_batch(encode_batch(images, prompts))[0], images)


def test_a_stalled_upload_is_dropped_by_the_socket_timeout():
    server = make_server(Exploding(), "127.0.0.1", 0, socket_timeout=0.2)
    start(server)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as client:
            client.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\npartial")
            started = time.monotonic()
            assert client.recv(1024) == b""  # the server closed the connection without waiting for the rest
            assert time.monotonic() - started < 2
    finally:
        server.shutdown()
        server.server_close()


def test_wildcard_bind_prints_a_reachable_url(monkeypatch, capsys):
    host = socket.gethostname()
    assert reachable_url("0.0.0.0", 8123) == f"http://{host}:8123" and reachable_url("::", 1) == f"http://{host}:1"
    assert reachable_url("127.0.0.1", 80) == "http://127.0.0.1:80" and reachable_url("::1", 80) == "http://[::1]:80"
    server = make_server(SlowlessReward(), "0.0.0.0", 0, token="secret")
    try:
        assert server.url == f"http://{host}:{server.server_address[1]}"
    finally:
        server.server_close()
    monkeypatch.setattr(server_module, "serve", lambda reward, h, p, token, insecure: None)
    server_module.serve_reward("shapes_geneval", "0.0.0.0", 8123, token="secret")
    assert f"http://{host}:8123 (bound to all interfaces" in capsys.readouterr().out


class SlowlessReward:
    spec = SPEC

    def __call__(self, images, prompts):
        return torch.zeros(images.shape[0])


def test_serve_reward_builds_the_registered_reward(monkeypatch):
    calls = []
    monkeypatch.setattr(
        server_module, "serve", lambda reward, host, port, token, insecure: calls.append((reward, host, port))
    )
    server_module.serve_reward("shapes_geneval", "0.0.0.0", 8123, insecure=True, judgement="correct")
    [(reward, host, port)] = calls
    assert isinstance(reward, ShapesGenEval) and reward.judgement == "correct" and (host, port) == ("0.0.0.0", 8123)
    with pytest.raises(KeyError, match="unknown reward"):
        server_module.serve_reward("shapes_genevl")


@pytest.fixture
def token_server(monkeypatch) -> Iterator[str]:
    """A shapes server that wants the bearer token "s3cret"; no token in the environment."""
    monkeypatch.delenv(server_module.TOKEN_ENV, raising=False)
    server = make_server(ShapesGenEval(), "127.0.0.1", 0, token="s3cret")
    start(server)
    yield server.url
    server.shutdown()
    server.server_close()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", "/score", body, {"Content-Type": "application/octet-stream", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_token_server_refuses_requests_without_the_token(token_server, monkeypatch):
    images, prompts = shapes_batch(2)
    with pytest.raises(RewardError, match=r"HTTP 401: .*bearer token"):
        RemoteReward(token_server, timeout=10, retries=0)  # GET /spec is guarded too
    with pytest.raises(RewardError, match="HTTP 401"):
        RemoteReward(token_server, timeout=10, retries=0, token="wrong")
    status, _ = post(token_server, encode_batch(images, prompts))
    assert status == 401
    expected = ShapesGenEval()(images, prompts)
    assert torch.equal(RemoteReward(token_server, timeout=10, retries=0, token="s3cret")(images, prompts), expected)
    monkeypatch.setenv(server_module.TOKEN_ENV, "s3cret")  # the client reads the same variable as the server
    assert torch.equal(RemoteReward(token_server, timeout=10, retries=0)(images, prompts), expected)


def test_non_loopback_binds_need_a_token_or_insecure(monkeypatch):
    monkeypatch.delenv(server_module.TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(ValueError, match=r"without a token.*--token .*DIFFRL_REWARD_TOKEN.*--insecure"):
            make_server(SlowlessReward(), host, 0)
    assert server_module.is_loopback("127.0.0.1") and server_module.is_loopback("::1")
    assert server_module.is_loopback("localhost") and not server_module.is_loopback("8.8.8.8")
    make_server(SlowlessReward(), "0.0.0.0", 0, insecure=True).server_close()
    monkeypatch.setattr(server_module, "serve", lambda *args: None)
    with pytest.raises(ValueError, match="without a token"):  # refused before the reward is built
        server_module.serve_reward("no_such_reward", "0.0.0.0", 8123)
    monkeypatch.setenv(server_module.TOKEN_ENV, "s3cret")
    server_module.serve_reward("shapes_geneval", "0.0.0.0", 8123)  # the environment's token guards it


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -0.5])
def test_the_server_refuses_bad_pixels_with_http_400(shapes_server, bad):
    _, url = shapes_server
    images, prompts = shapes_batch(3)
    images[1, 0, 5, 5] = bad
    status, body = post(url, encode_batch(images, prompts))
    assert status == 400 and b"batch positions [1]" in body
    with pytest.raises(RewardError, match=r"batch positions \[1\]"):  # the client refuses before sending
        RemoteReward(url, timeout=10, retries=0)(images, prompts)
