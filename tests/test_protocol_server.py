"""Network stage server: remote value_and_grad equals in-process; token, limits, timeouts."""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jacana.protocol import errors
from jacana.protocol.cli import register
from jacana.protocol.message import Message, decode, encode
from jacana.protocol.pipeline import Pipeline, as_jax_function
from jacana.protocol.rpc import RemoteStage
from jacana.protocol.server import StageServer, TcpTransport, load_token
from jacana.protocol.stage import JaxStage
from jacana.protocol.transport import frame, read_frame

TOKEN = "test-token-0123456789abcdef"
X = np.linspace(-1, 1, 8).astype(np.float32)


def server_stage():
    """Factory used by the subprocess server test (module:callable)."""
    return JaxStage(lambda p, i: {"y": p["a"] * i["x"] ** 2 + p["b"] * i["x"]},
                    {"a": np.float32(1), "b": np.float32(0)}, {"x": X}, stage_id="poly",
                    differentiable_inputs=["x"])


def loss_stage():
    return JaxStage(lambda p, i: {"loss": (i["y"] ** 2).sum() + p["c"]}, {"c": np.float32(0)},
                    {"y": X}, differentiable_inputs=["y"], stage_id="loss")


PARAMS = {"a": np.float32(1.5), "b": np.float32(-0.5), "c": np.float32(0.25)}


def value_and_grad(first_stage, mode="jacobian"):
    f = as_jax_function(Pipeline([first_stage, loss_stage()]), mode=mode)
    return jax.value_and_grad(lambda p: f(p, {"x": X})["loss"])(PARAMS)


def assert_same(r1, r2):
    np.testing.assert_allclose(r1[0], r2[0], rtol=1e-6)
    for k in r1[1]:
        np.testing.assert_allclose(r1[1][k], r2[1][k], rtol=1e-6, err_msg=k)


def raw_exchange(address, *frames, read=True, timeout=5.0, expect=None):
    """Send raw frames; return the decoded replies until the server closes or stops answering."""
    with socket.create_connection(address, timeout=timeout) as s:
        for f in frames:
            s.sendall(f)
        replies = []
        if read:
            reader = lambda n: s.recv(n)  # noqa: E731
            try:
                while expect is None or len(replies) < expect:
                    data = read_frame(reader)
                    if data is None:
                        break
                    replies.append(decode(data))
            except (socket.timeout, ConnectionError, errors.ProtocolError):
                pass
        return replies


def hello(token=TOKEN):
    return frame(encode(Message("hello", meta={"token": token})))


@pytest.fixture()
def server():
    with StageServer(server_stage(), token=TOKEN, timeout=2.0, max_bytes=1 << 16) as srv:
        yield srv


@pytest.mark.parametrize("mode", ["jacobian", "vjp"])
def test_served_stage_takes_part_in_value_and_grad(server, mode):
    local = value_and_grad(server_stage(), mode)
    with TcpTransport(*server.address, token=TOKEN) as t:
        remote = value_and_grad(RemoteStage(t), mode)
    assert_same(local, remote)
    assert server.address[0] == "127.0.0.1"


def test_wrong_or_missing_token_is_refused(server):
    for first in (hello("wrong-token-0123456789abcdef"), hello(TOKEN[:-1]),
                  frame(encode(Message("apply", {"a": np.float32(1)})))):
        replies = raw_exchange(server.address, first, frame(encode(Message("describe"))))
        assert [r.kind for r in replies] == ["error"]
        assert replies[0].meta["error"]["code"] == "auth"
        assert TOKEN not in str(replies[0].meta)
    with pytest.raises(errors.AuthenticationError):
        RemoteStage(TcpTransport(*server.address, token="wrong-token-0123456789abcdef"))


def test_token_sources_and_minimum_length(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert load_token(token_file=str(path)) == TOKEN
    assert load_token(environ={"JACANA_STAGE_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(errors.AuthenticationError, match="required"):
        load_token(environ={})
    with pytest.raises(errors.AuthenticationError, match="at least 16"):
        load_token("short")
    with pytest.raises(errors.AuthenticationError, match="cannot read"):
        load_token(token_file=str(tmp_path / "absent"))
    monkeypatch.delenv("JACANA_STAGE_TOKEN", raising=False)
    with pytest.raises(errors.AuthenticationError, match="required"):
        StageServer(server_stage())
    monkeypatch.setenv("JACANA_STAGE_TOKEN", TOKEN)
    StageServer(server_stage()).close()


def test_oversized_frame_is_refused_before_reading(server):
    replies = raw_exchange(server.address, hello(), struct.pack("<Q", 1 << 40))
    assert [r.kind for r in replies] == ["hello", "error"]
    assert replies[1].meta["error"]["code"] == "too_large"
    with TcpTransport(*server.address, token=TOKEN) as t:
        reply = t.request(Message("apply", {"a": np.zeros(1 << 14, np.float64)}))  # 128 KiB > 64 KiB limit
        assert reply.kind == "error" and reply.meta["error"]["code"] == "too_large"


def test_malformed_messages_are_answered_and_server_keeps_serving(server):
    bad = [b"", b"JCNA", b"not a message at all", encode(Message("apply"))[:-3] + b"xyz",
           encode(Message("apply", {"x": np.ones(3)}))[:-8], b"JCNA\x08\x00\x00\x00{}      "]
    replies = raw_exchange(server.address, hello(), *[frame(b) for b in bad], frame(encode(Message("describe"))),
                           expect=len(bad) + 2)
    kinds = [r.kind for r in replies]
    assert kinds == ["hello"] + ["error"] * len(bad) + ["describe"]
    codes = {r.meta["error"]["code"] for r in replies[1:-1]}
    assert codes <= {"malformed", "truncated", "version"}


def test_stalled_client_is_dropped_after_the_timeout(server):
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(hello())
        assert decode(read_frame(lambda n: s.recv(n))).kind == "hello"
        s.sendall(struct.pack("<Q", 100) + b"JCNA")  # then stall mid-frame
        t0 = time.monotonic()
        assert s.recv(1) == b""  # the server closes the connection
        assert time.monotonic() - t0 < 8


def test_wrong_version_and_dtype_are_reported(server):
    good = encode(Message("apply", {"a": np.float32(1), "b": np.float32(0), "x": X}, param_names=("a", "b")))
    v2 = good.replace(b'"version":"1.0"', b'"version":"2.0"')
    dt = good.replace(b'"dtype":"float32"', b'"dtype":"object!"', 1)
    replies = raw_exchange(server.address, hello(), frame(v2), frame(dt), frame(good), expect=4)
    assert [r.kind for r in replies] == ["hello", "error", "error", "apply"]
    assert [r.meta["error"]["code"] for r in replies[1:3]] == ["version", "dtype"]


def test_cli_registers_serve_stage():
    parser = argparse.ArgumentParser(prog="jacana")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve-stage", "--stage", "m:f", "--port", "0"])
    assert args.host == "127.0.0.1" and args.stage == "m:f" and callable(args.func)


def test_subprocess_server_matches_in_process(tmp_path):
    env = {**os.environ, "JACANA_STAGE_TOKEN": TOKEN, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jacana.protocol.cli", "--stage", "test_protocol_server:server_stage",
         "--port", "0", "--idle-exit", "20", "--timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"serving 'poly' on ([\d.]+):(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        with TcpTransport(m.group(1), int(m.group(2)), token=TOKEN) as t:
            remote = value_and_grad(RemoteStage(t))
        assert_same(value_and_grad(server_stage()), remote)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert TOKEN not in line + out + err
