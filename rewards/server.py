"""Serve any Reward over HTTP, and score through one with :class:`RemoteReward`.

This plays the part of FlowGRPO's reward server (``yifan123/reward-server``), which keeps heavy
scorers (the GenEval detector) in their own process or environment. The wire format is ours:

* ``GET /spec`` → the reward's :class:`RewardSpec` as JSON.
* ``POST /score`` with an ``.npz`` body (``allow_pickle=False``): ``images`` (B, 3, H, W), float32
  in [0, 1] or uint8 in [0, 255], and ``prompts``, a UTF-8 JSON list of ``{"text", "metadata"}``
  stored as a uint8 array. Answer: ``{"reward": name, "scores": [B floats]}``, or an HTTP error with
  ``{"error": message}``.

The server refuses a batch no reward can score (:func:`check_images`: non-finite or out-of-range
pixels) with HTTP 400, checks the reward's output with :func:`check_scores` before answering, and the
client checks the answer again; a dead server, a timeout or a garbled answer raise :class:`RewardError`.
The client retries only what cannot have reached the server (a refused or timed-out connection), so
a slow ``/score`` is never sent twice. The server reads a request with a socket timeout and accepts
only uncompressed ``.npz`` bodies (``np.savez``) whose arrays fit the body, so a small body cannot
expand into a huge allocation.

Authentication: with a token (``--token``, or ``DIFFRL_REWARD_TOKEN`` in the environment) every request
must carry ``Authorization: Bearer <token>`` (else HTTP 401); :class:`RemoteReward` sends it. A server
bound to a non-loopback address without a token is refused unless ``insecure=True`` (``--insecure``).
"""

from __future__ import annotations

import dataclasses
import hmac
import http.client
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from harness.types import Prompt, Reward, RewardError, RewardSpec, check_images, check_scores

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 31  # 2 GiB: a batch of 64 float32 1024² images is 0.8 GB
SOCKET_TIMEOUT = 120.0  # seconds the server waits on any one read from or write to a client
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
TOKEN_ENV = "DIFFRL_REWARD_TOKEN"  # the bearer token of server and client when none is passed


def env_token() -> str | None:
    """``$DIFFRL_REWARD_TOKEN``, or None when it is unset or empty."""
    return os.environ.get(TOKEN_ENV) or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only; a wildcard address does not."""
    if host in WILDCARD_HOSTS:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """``ValueError`` for a server that other hosts could reach without a token, unless ``insecure``."""
    if token is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r} without a token: any host that reaches it could use the reward; pass "
            f"--token (or set {TOKEN_ENV}) and give the clients the same token, bind 127.0.0.1, or pass --insecure"
        )


def encode_batch(images: Tensor, prompts: Sequence[Prompt], dtype: Literal["float32", "uint8"] = "float32") -> bytes:
    """The ``/score`` request body for a batch (``uint8`` quantises to 1/255 and is 4× smaller)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    array = images.detach().float().cpu().numpy()
    if dtype == "uint8":
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    elif dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    try:
        text = json.dumps([{"text": p.text, "metadata": dict(p.metadata)} for p in prompts], allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"prompt metadata must be JSON-serialisable to send it to a reward server: {error}") from None
    buffer = io.BytesIO()
    np.savez(buffer, images=array, prompts=np.frombuffer(text.encode(), dtype=np.uint8))
    return buffer.getvalue()


def check_npz(body: bytes) -> None:
    """``ValueError`` unless every member of the ``.npz`` is stored uncompressed and its array fits in it.

    ``np.savez`` stores members uncompressed, so no member can be larger than the body; an ``.npy``
    header that declares more elements than its member holds (numpy would allocate them before it
    noticed the short read) is rejected too.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"npz member {info.filename!r} is compressed; send an uncompressed np.savez body")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise ValueError(f"npz member {info.filename!r} has .npy format {version}; expected 1.0 or 2.0")
                nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if dtype.hasobject or nbytes > info.file_size:
                    raise ValueError(
                        f"npz member {info.filename!r} declares {shape} {dtype} ({nbytes} bytes) but holds "
                        f"{info.file_size} bytes"
                    )
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"request body is not an npz with 'images' and 'prompts': {error}") from None


def decode_batch(body: bytes) -> tuple[Tensor, list[Prompt]]:
    """Inverse of :func:`encode_batch`; ``ValueError`` on a malformed body (see :func:`check_npz`)."""
    check_npz(body)
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            array, raw = npz["images"], npz["prompts"]
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ValueError(f"request body is not an npz with 'images' and 'prompts': {error}") from None
    if array.ndim != 4 or array.shape[1] != 3 or array.dtype not in (np.float32, np.uint8):
        raise ValueError(f"'images' must be (B, 3, H, W) float32 or uint8, got {array.shape} {array.dtype}")
    images = torch.from_numpy(array.astype(np.float32) / 255 if array.dtype == np.uint8 else array.copy())
    items = json.loads(raw.tobytes().decode())
    ok = isinstance(items, list) and len(items) == images.shape[0]
    if not ok or not all(isinstance(i, dict) and isinstance(i.get("text"), str) for i in items):
        raise ValueError(f"'prompts' must be a JSON list of {images.shape[0]} {{text, metadata}} objects")
    return images, [Prompt(item["text"], item.get("metadata", {})) for item in items]


def spec_to_json(spec: RewardSpec) -> dict[str, Any]:
    """A spec as a JSON object (``value_range`` becomes a list)."""
    return dataclasses.asdict(spec)


def spec_from_json(data: Any) -> RewardSpec:
    """A spec from :func:`spec_to_json`'s output; :class:`RewardError` when fields are missing or mistyped."""
    fields = {f.name for f in dataclasses.fields(RewardSpec)}
    if not isinstance(data, dict) or not {"name", "version", "description"} <= set(data) <= fields:
        raise RewardError(f"reward server sent a malformed spec {data!r}; expected the keys {sorted(fields)}")
    low, high = data.get("value_range", (0.0, 1.0))
    return RewardSpec(**{**data, "value_range": (float(low), float(high))})


def reachable_url(host: str, port: int) -> str:
    """``http://host:port``; a wildcard bind address (``0.0.0.0``) is replaced by this machine's host name."""
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RewardServer(ThreadingHTTPServer):
    """An HTTP server bound to one reward; requests are scored one at a time (a lock guards the model).

    ``socket_timeout``: seconds a handler waits on one read or write before it drops the client.
    """

    daemon_threads = True

    def __init__(
        self, reward: Reward, address: tuple[str, int], socket_timeout: float = SOCKET_TIMEOUT, token: str | None = None
    ) -> None:
        super().__init__(address, RewardHandler)
        self.reward, self.lock, self.host = reward, threading.Lock(), address[0]
        self.socket_timeout, self.token = socket_timeout, token

    @property
    def url(self) -> str:
        """``http://host:port`` with the port actually bound (the host name when bound to all interfaces)."""
        return reachable_url(self.host, self.server_address[1])


class RewardHandler(BaseHTTPRequestHandler):
    """``GET /spec`` and ``POST /score`` for :class:`RewardServer`."""

    server: RewardServer

    def setup(self) -> None:
        # StreamRequestHandler.setup() applies self.timeout to the connection; typeshed wrongly marks it ClassVar.
        self.timeout = self.server.socket_timeout  # type: ignore[misc]
        super().setup()

    def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        """True without a server token, or when the request carries it; else answers 401 (and drops the body)."""
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
        body = json.dumps({"error": f"missing or wrong bearer token; set {TOKEN_ENV} (or pass token=) to the "
                                    "server's token"}).encode()  # fmt: skip
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True  # a POST body, if any, was not read
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._authorized():
            return
        if self.path != "/spec":
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path!r}; use GET /spec or POST /score"})
            return
        self._answer(HTTPStatus.OK, spec_to_json(self.server.reward.spec))

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path != "/score":
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path!r}; use POST /score"})
            return
        header = self.headers.get("Content-Length", "")
        length = int(header) if header.strip().isdigit() else -1
        if not 0 < length <= MAX_REQUEST_BYTES:
            self._answer(
                HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be 1..{MAX_REQUEST_BYTES}, got {header!r}"}
            )
            self.close_connection = True  # the body, if any, was not read
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            logger.warning("client %s stalled while sending %d bytes; dropped", self.address_string(), length)
            self.close_connection = True
            return
        if len(body) != length:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"body ended after {len(body)} of {length} bytes"})
            return
        reward = self.server.reward
        try:
            images, prompts = decode_batch(body)
            check_images(reward.spec.name, images)  # NaN or out-of-range pixels: the client's error, not a score
        except (ValueError, RewardError) as error:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        try:
            with self.server.lock:
                scores = check_scores(reward.spec.name, reward(images, prompts), images.shape[0])
        except Exception as error:  # the process boundary: any scorer failure becomes a 500 the client raises
            logger.exception("reward %s failed", reward.spec.name)
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})
            return
        self._answer(HTTPStatus.OK, {"reward": reward.spec.name, "scores": scores.tolist()})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s - " + format, self.address_string(), *args)


def make_server(
    reward: Reward, host: str = "127.0.0.1", port: int = 0, socket_timeout: float = SOCKET_TIMEOUT,
    token: str | None = None, insecure: bool = False,
) -> RewardServer:  # fmt: skip
    """A bound, not yet running server (``port=0`` picks a free port; see ``server.url``).

    ``token``: the bearer token every request must carry (None: no authentication). Without one, a
    non-loopback ``host`` is refused with ``ValueError`` unless ``insecure``.
    """
    check_exposure(host, token, insecure)
    return RewardServer(reward, (host, port), socket_timeout, token)


def serve(
    reward: Reward, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, insecure: bool = False
) -> None:
    """Serve ``reward`` until interrupted."""
    server = make_server(reward, host, port, token=token, insecure=insecure)
    logger.info("serving reward %s (%s) at %s", reward.spec.name, reward.spec.version, server.url)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def serve_reward(
    name: str, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None, insecure: bool = False,
    **reward_kwargs: Any,
) -> None:  # fmt: skip
    """Build the registered reward ``name`` with ``reward_kwargs`` (checked against its signature) and serve it.

    ``token`` (default ``$DIFFRL_REWARD_TOKEN``) and ``insecure``: see :func:`make_server`; checked before the
    reward is built.
    """
    from harness.config import call_checked
    from rewards import REWARDS

    token = token or env_token()
    check_exposure(host, token, insecure)
    REWARDS.check(name)
    reward = call_checked(REWARDS.get(name), reward_kwargs, where=f"reward {name}")
    where = reachable_url(host, port) + (f" (bound to all interfaces as {host})" if host in WILDCARD_HOSTS else "")
    auth = "bearer token required" if token else "no authentication"
    print(f"serving reward {reward.spec.name!r} on {where} (POST /score, GET /spec; {auth})", flush=True)
    serve(reward, host, port, token, insecure)


class RemoteReward:
    """A Reward scored by a :func:`serve` server at ``url`` (``http://host:port``, optionally with a path prefix).

    ``connect_timeout`` (default: ``timeout``) bounds opening the connection; ``timeout`` bounds each
    read of the answer, i.e. how long the server may take to score a batch. Only failures to connect
    are retried, ``retries`` times with exponential backoff (``backoff · 2^k`` seconds): such a request
    never reached the server. Once a ``/score`` request is sent, a timeout or a dropped connection
    raises :class:`RewardError` at once, since the server may still be scoring it and a resend would
    queue a duplicate behind it (``GET /spec`` is idempotent and retried on any failure). HTTP errors
    are never retried. ``spec`` is fetched from the server unless given. ``dtype="uint8"`` sends
    quantised images (exact for rewards that quantise to uint8 themselves). ``token`` (default
    ``$DIFFRL_REWARD_TOKEN``) is sent as ``Authorization: Bearer``; prefer the environment variable to a suite
    option, since a suite's options are written to its ``suite.yaml``. Images are checked (:func:`check_images`)
    before they are sent.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        spec: RewardSpec | None = None,
        dtype: Literal["float32", "uint8"] = "float32",
        connect_timeout: float | None = None,
        token: str | None = None,
    ) -> None:
        connect_timeout = timeout if connect_timeout is None else connect_timeout
        if retries < 0 or timeout <= 0 or backoff < 0 or connect_timeout <= 0:
            raise ValueError(
                "need timeout > 0, connect_timeout > 0, retries >= 0, backoff >= 0; got "
                f"{timeout}, {connect_timeout}, {retries}, {backoff}"
            )
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like http://host:port, got {url!r}")
        self.url, self.timeout, self.connect_timeout = url.rstrip("/"), timeout, connect_timeout
        self.retries, self.backoff, self.dtype = retries, backoff, dtype
        self._token = token or env_token()  # private: kept out of repr-like dumps of the reward's attributes
        self._parts, self._host = parts, parts.hostname  # hostname: checked non-empty above
        self.spec = spec if spec is not None else spec_from_json(self._request("/spec", None))

    def _connect(self) -> http.client.HTTPConnection:
        """An open connection; a refused or timed-out connect is retried (nothing was sent yet)."""
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        for attempt in range(self.retries + 1):
            connection = cls(self._host, self._parts.port, timeout=self.connect_timeout)
            try:
                connection.connect()
            except OSError as error:  # refused, unreachable, DNS, connect timeout (TimeoutError is an OSError)
                connection.close()
                if attempt == self.retries:
                    raise RewardError(
                        f"reward server {self.url} failed after {attempt + 1} attempt(s) to connect "
                        f"(connect timeout {self.connect_timeout}s): {error}. Is `diffrl serve-reward` running there?"
                    ) from None
                time.sleep(self.backoff * 2**attempt)
                continue
            assert connection.sock is not None
            connection.sock.settimeout(self.timeout)  # from here on: how long the server may take to answer
            return connection
        raise AssertionError("unreachable")

    def _request(self, path: str, body: bytes | None) -> Any:
        """JSON answer of GET (``body=None``) or POST ``path``; :class:`RewardError` on failure."""
        attempts = self.retries + 1 if body is None else 1  # GET /spec is idempotent: retry it on any failure
        for attempt in range(attempts):
            connection = self._connect()
            try:
                headers = {} if body is None else {"Content-Type": "application/octet-stream"}
                if self._token is not None:
                    headers["Authorization"] = f"Bearer {self._token}"
                connection.request("GET" if body is None else "POST", self._parts.path + path, body, headers)
                response = connection.getresponse()
                status, raw = response.status, response.read()
                break
            except (OSError, http.client.HTTPException) as error:
                if attempt + 1 < attempts:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                what = "timed out" if isinstance(error, TimeoutError) else f"failed ({type(error).__name__}: {error})"
                raise RewardError(
                    f"reward server {self.url}{path} {what} after the request was sent (timeout {self.timeout}s); "
                    "not retried: the server may still be working on it"
                ) from None
            finally:
                connection.close()
        if status >= 400:
            detail = raw.decode(errors="replace")[:2000]
            raise RewardError(f"reward server {self.url}{path} answered HTTP {status}: {detail}")
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except ValueError as error:
            raise RewardError(f"reward server {self.url}{path} sent invalid JSON ({error}): {raw[:200]!r}") from None

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_images(self.spec.name, images)
        answer = self._request("/score", encode_batch(images, prompts, self.dtype))
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, int | float) for s in scores):
            raise RewardError(
                f"reward server {self.url} answered without a list of numbers in 'scores': {answer!r:.200}"
            )
        if answer.get("reward") != self.spec.name:
            raise RewardError(f"reward server {self.url} serves {answer.get('reward')!r}, expected {self.spec.name!r}")
        return check_scores(self.spec.name, torch.tensor(scores, dtype=torch.float32), images.shape[0])


def _reject_constant(name: str) -> float:
    """JSON NaN/Infinity are not valid scores."""
    raise ValueError(f"non-finite number {name} in the answer")
