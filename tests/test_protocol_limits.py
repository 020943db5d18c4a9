"""The stage server under hostile and careless clients (issue #24): hello deadline and pre-auth
limits, slots that clients without the token cannot take, max_connections, idle deadlines, the
in-flight byte budget, declared signatures enforced, token files, and memory per message.

Each test here was checked to fail with the deliberate bug it names (see docs/reliability.md).
Everything runs on 127.0.0.1."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jacana.protocol import errors
from jacana.protocol.message import MAGIC, PREFIX, Message, decode, encode
from jacana.protocol.rpc import RemoteStage, conform
from jacana.protocol.server import HELLO_MAX_BYTES, MAX_TOKEN_FILE_BYTES, StageServer, TcpTransport, load_token
from jacana.protocol.stage import JaxStage, Stage, StageSpec, TensorSpec
from jacana.protocol.transport import frame, read_frame
from test_protocol_server import X, server_stage as poly_stage  # the same y = a x^2 + b x stage

TOKEN = "limits-token-0123456789abcdef"
PARAMS = {"a": np.float32(1.5), "b": np.float32(-0.5)}


def hello(token=TOKEN, **meta):
    return frame(encode(Message("hello", meta={"token": token, **meta})))


def read_reply(sock, timeout):
    """The next decoded frame, or None at EOF; raises socket.timeout after ``timeout``."""
    sock.settimeout(timeout)
    data = read_frame(lambda n: sock.recv(n))
    return None if data is None else decode(data)


def served_within(address, seconds=2.0):
    """Seconds a client with the token needs to connect, authenticate and get an apply answered."""
    t0 = time.monotonic()
    with TcpTransport(*address, token=TOKEN, timeout=seconds + 3) as t:
        y = RemoteStage(t, spec=poly_stage().describe()).apply(PARAMS, {"x": X})["y"]
    np.testing.assert_allclose(y, 1.5 * X**2 - 0.5 * X, rtol=1e-6)
    return time.monotonic() - t0


class Trickler(threading.Thread):
    """``n`` connections without the token, each sending one byte of a plausible hello every
    ``period`` seconds, and connecting again ``period`` seconds after the server drops it."""

    def __init__(self, address, n, period=1.0):
        super().__init__(daemon=True)
        self.address, self.n, self.period = address, n, period
        self.stop = threading.Event()
        self.connects = self.drops = 0
        self.open = 0
        self.payload = struct.pack("<Q", 200) + MAGIC + b"\xc0\x00\x00\x00" + b'{"kind":"hello"' + b" " * 200

    def run(self):
        socks, pos, due = [None] * self.n, [0] * self.n, [0.0] * self.n
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                for i in range(self.n):
                    if now < due[i]:
                        continue
                    due[i] = now + self.period
                    s = socks[i]
                    if s is None:
                        try:
                            s = socket.create_connection(self.address, timeout=1)
                        except OSError:
                            continue
                        s.setblocking(False)
                        socks[i], pos[i] = s, 0
                        self.connects += 1
                        continue
                    try:
                        if select.select([s], [], [], 0)[0]:  # closed, or refused: dropped
                            raise ConnectionError
                        s.send(self.payload[pos[i] : pos[i] + 1])
                        pos[i] = (pos[i] + 1) % len(self.payload)
                    except OSError:
                        s.close()
                        socks[i] = None
                        self.drops += 1
                self.open = sum(s is not None for s in socks)
                time.sleep(0.02)
        finally:
            for s in socks:
                if s is not None:
                    s.close()


def run_trickle_attack(address, n=48, duration=8.0, probes=(1.5, 3.0, 4.5, 6.0, 7.5)):
    """(seconds each probe of a client with the token took, or the error it got; the trickler).
    The stage is called once before the attack, so that no probe pays for its compilation."""
    served_within(address, 30.0)
    attack = Trickler(address, n)
    attack.start()
    t0, results = time.monotonic(), []
    try:
        for at in probes:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            try:
                results.append(served_within(address))
            except errors.ProtocolError as exc:
                results.append(exc)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
    finally:
        attack.stop.set()
        attack.join(5)
    return results, attack


# --- slots, deadlines, limits -----------------------------------------------------------------

def test_trickling_clients_cannot_keep_a_client_with_the_token_out():
    """48 connections without the token trickle a hello one byte a second (more than the 32
    slots, and three times the 16 pending places): a client with the token is served within 2 s,
    every time, while they go on. Old server: every probe got a reset for the whole attack."""
    with StageServer(poly_stage(), token=TOKEN, hello_timeout=2.0, max_pending=16, timeout=5.0) as server:
        results, attack = run_trickle_attack(server.address)
        assert attack.connects >= 48 and attack.drops > 0  # the attack ran, and was cut short
        assert all(isinstance(r, float) and r < 2.0 for r in results), results
        assert served_within(server.address) < 2.0


def test_a_hello_must_arrive_within_the_hello_timeout():
    with StageServer(poly_stage(), token=TOKEN, hello_timeout=1.0) as server:
        with socket.create_connection(server.address) as s:  # says nothing
            t0 = time.monotonic()
            reply = read_reply(s, 5)
            assert reply.meta["error"]["code"] == "auth" and "hello" in reply.meta["error"]["message"]
            assert read_reply(s, 5) is None and 0.9 < time.monotonic() - t0 < 3
        with socket.create_connection(server.address) as s:  # sends a good hello, too slowly
            data, t0 = hello(), time.monotonic()
            for k in range(len(data)):
                if select.select([s], [], [], 0.05)[0]:  # the server has answered
                    break
                s.sendall(data[k : k + 1])
            reply = read_reply(s, 5)
            assert reply.kind == "error" and reply.meta["error"]["code"] == "auth"
            assert k < len(data) - 1 and time.monotonic() - t0 < 3


def test_the_pre_auth_frame_limit_is_64_kib_even_when_max_bytes_is_large():
    """Before the token is checked, a frame above 64 KiB is refused at once, unread; one of exactly
    64 KiB (a hello padded in its meta) is read. Fails if the pre-auth limit is raised (e.g. to
    256 MiB: the server then waits for the body, and only the hello deadline ends it)."""
    assert HELLO_MAX_BYTES == 1 << 16
    with StageServer(poly_stage(), token=TOKEN, hello_timeout=5.0, max_bytes=256 << 20) as server:
        for size in (HELLO_MAX_BYTES + 1, 256 << 20, 1 << 62):
            with socket.create_connection(server.address) as s:
                t0 = time.monotonic()
                s.sendall(struct.pack("<Q", size) + b"JCNA")
                reply = read_reply(s, 1.5)  # socket.timeout if the server waits for the body
                assert reply.meta["error"]["code"] == "too_large", reply.meta
                assert str(HELLO_MAX_BYTES) in reply.meta["error"]["message"]
                assert read_reply(s, 2) is None and time.monotonic() - t0 < 1.5
        pad = "x" * (HELLO_MAX_BYTES - len(encode(Message("hello", meta={"token": TOKEN, "pad": ""}))))
        exact = encode(Message("hello", meta={"token": TOKEN, "pad": pad}))
        assert len(exact) == HELLO_MAX_BYTES
        with socket.create_connection(server.address) as s:
            s.sendall(frame(exact))
            assert read_reply(s, 5).kind == "hello"


def test_max_connections_is_enforced_and_a_freed_slot_is_reused():
    """With max_connections=2, a third client with the token is told the server is busy; once one
    leaves, the next is served. Fails if max_connections is ignored."""
    spec = poly_stage().describe()
    with StageServer(poly_stage(), token=TOKEN, max_connections=2) as server:
        first, second = (TcpTransport(*server.address, token=TOKEN, timeout=5) for _ in range(2))
        for t in (first, second):
            RemoteStage(t, spec=spec).apply(PARAMS, {"x": X})
        assert server.active_connections == 2
        with pytest.raises(errors.TransportError, match="busy"):
            RemoteStage(TcpTransport(*server.address, token=TOKEN, timeout=5), spec=spec).apply(PARAMS, {"x": X})
        first.close()
        deadline = time.monotonic() + 5
        while server.active_connections > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with TcpTransport(*server.address, token=TOKEN, timeout=5) as third:
            RemoteStage(third, spec=spec).apply(PARAMS, {"x": X})
        second.close()


def test_clients_without_the_token_never_take_a_slot():
    spec = poly_stage().describe()
    with StageServer(poly_stage(), token=TOKEN, max_connections=1, hello_timeout=5.0) as server:
        idle = [socket.create_connection(server.address) for _ in range(10)]
        try:
            time.sleep(0.2)
            assert server.active_connections == 0
            with TcpTransport(*server.address, token=TOKEN, timeout=5) as t:
                RemoteStage(t, spec=spec).apply(PARAMS, {"x": X})
        finally:
            for s in idle:
                s.close()


def test_an_idle_connection_is_closed_and_the_client_reconnects_by_itself():
    spec = poly_stage().describe()
    with StageServer(poly_stage(), token=TOKEN, idle_timeout=0.5) as server:
        with TcpTransport(*server.address, token=TOKEN, timeout=5) as t:
            stage = RemoteStage(t, spec=spec)
            stage.apply(PARAMS, {"x": X})
            assert t.server_meta["idle_timeout"] == 0.5
            deadline = time.monotonic() + 5
            while server.active_connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.active_connections == 0  # closed by the server
            y = stage.apply(PARAMS, {"x": X})["y"]  # sent again on a new connection
            np.testing.assert_allclose(y, 1.5 * X**2 - 0.5 * X, rtol=1e-6)


class SumStage(Stage):
    """numpy only: x (n float32) -> sum."""

    stage_id = "sum"

    def __init__(self, n):
        self.n = n

    def describe(self, inputs=None):
        return StageSpec("sum", (), (TensorSpec("x", (self.n,), "float32"),), (TensorSpec("y", (), "float32"),))

    def apply(self, params, inputs):
        return {"y": np.float32(np.asarray(inputs["x"]).sum())}

    def vjp(self, params, inputs, cotangents, wrt=None):
        return {}


def test_the_inflight_byte_budget_holds_a_second_request_back():
    """Budget 1 MiB: while one client's 800 kB request is still arriving, another's waits for room
    and is served once the first is done."""
    n = 200_000  # 800 kB of float32
    x = np.ones(n, np.float32)
    data = frame(encode(Message("apply", {"x": x})))
    with StageServer(SumStage(n), token=TOKEN, max_bytes=1 << 20, max_inflight_bytes=1 << 20,
                     timeout=5.0) as server:
        with socket.create_connection(server.address) as slow, \
                TcpTransport(*server.address, token=TOKEN, timeout=10) as other:
            slow.sendall(hello())
            assert read_reply(slow, 5).kind == "hello"
            slow.sendall(data[:1000])  # holds 800 kB of the budget, its body still coming
            time.sleep(0.2)
            rest = threading.Timer(1.0, slow.sendall, (data[1000:],))
            rest.start()
            t0 = time.monotonic()
            assert float(other.request(Message("apply", {"x": x})).tensors["y"]) == n
            assert time.monotonic() - t0 > 0.7  # it waited for the first request
            assert float(read_reply(slow, 5).tensors["y"]) == n
            rest.join()


def test_a_request_that_finds_no_room_in_time_is_answered_busy_and_the_connection_lives():
    n = 200_000
    x = np.ones(n, np.float32)
    with StageServer(SumStage(n), token=TOKEN, max_bytes=1 << 20, max_inflight_bytes=1 << 20,
                     timeout=1.0) as server:
        with TcpTransport(*server.address, token=TOKEN, timeout=10) as other:
            with socket.create_connection(server.address) as slow:
                slow.sendall(hello())
                assert read_reply(slow, 5).kind == "hello"
                data = frame(encode(Message("apply", {"x": x})))
                slow.sendall(data[:1000])
                stop = threading.Event()

                def trickle():  # a byte every 0.2 s: alive, but far too slow for its deadline
                    for k in range(1000, 1100):
                        if stop.wait(0.2):
                            return
                        try:
                            slow.sendall(data[k : k + 1])
                        except OSError:
                            return

                threading.Thread(target=trickle, daemon=True).start()
                time.sleep(0.2)
                t0 = time.monotonic()
                reply = other.request(Message("apply", {"x": x}))
                assert reply.kind == "error" and reply.meta["error"]["code"] == "transport"
                assert "busy" in reply.meta["error"]["message"] and 0.9 < time.monotonic() - t0 < 5
                # the slow frame misses its deadline (timeout + 1 s per MiB): dropped, budget returned;
                # the busy connection goes on
                assert float(other.request(Message("apply", {"x": x})).tensors["y"]) == n
                assert read_reply(slow, 5) is None
                stop.set()


# --- declared signatures ------------------------------------------------------------------------

def raw_call(address, *messages, timeout=5.0):
    with socket.create_connection(address) as s:
        s.sendall(hello() + b"".join(frame(encode(m)) for m in messages))
        replies = [read_reply(s, timeout) for _ in range(len(messages) + 1)]
    assert replies[0].kind == "hello"
    return replies[1:]


def apply_msg(x, **params):
    p = {**PARAMS, **params}
    return Message("apply", {**p, "x": x}, param_names=tuple(p))


def test_inputs_outside_the_declared_signature_are_malformed_and_compile_nothing():
    stage = poly_stage()
    with StageServer(stage, token=TOKEN) as server:
        good = raw_call(server.address, apply_msg(X))[0]
        assert good.kind == "apply"
        compiled = len(stage._cache)
        bad = [apply_msg(np.ones(n, np.float32)) for n in range(1, 41) if n != X.size]  # 39 other shapes
        bad += [apply_msg(X.astype(np.float16).astype(np.int32)), apply_msg(X.reshape(2, 4)),
                apply_msg(X.astype(np.complex64)), apply_msg(X, a=np.float64(1.5)),
                Message("apply", {**PARAMS}, param_names=tuple(PARAMS)),  # input missing
                Message("apply", {**PARAMS, "x": X, "z": X}, param_names=tuple(PARAMS)),  # unknown input
                Message("apply", {**PARAMS, "x": X}, param_names=("a",)),  # a parameter sent as an input
                Message("vjp", {**PARAMS, "x": X, "cotangent:y": np.ones(3, np.float32)}, param_names=tuple(PARAMS)),
                Message("jvp", {**PARAMS, "x": X, "tangent:q": np.ones(8, np.float32)}, param_names=tuple(PARAMS))]
        replies = raw_call(server.address, *bad)
        for msg, reply in zip(bad, replies):
            assert reply.kind == "error" and reply.meta["error"]["code"] == "malformed", reply.meta
            assert "poly" in reply.meta["error"]["message"]
        assert "has shape [1] and dtype float32; the stage declares shape [8] and dtype float32" in \
            replies[0].meta["error"]["message"]
        assert "list it in params.names" in replies[-3].meta["error"]["message"]
        assert len(stage._cache) == compiled  # nothing new was compiled


def test_a_lossless_widening_is_converted_to_the_declared_dtype():
    """A client running JAX without x64 sends float32 to a float64 stage; old clients send float64
    cotangents to float32 outputs: both are served in the declared dtype, with one program."""
    stage = JaxStage(lambda p, i: {"y": p["a"] * i["x"]}, {"a": np.float64(1)}, {"x": np.ones(4)}, stage_id="f64")
    spec = stage.describe()
    p, i, d = conform(spec, {"a": np.float32(2)}, {"x": np.ones(4, np.float32)}, {"cotangent:": {"y": np.ones(4, np.float32)}})
    assert p["a"].dtype == np.float64 and i["x"].dtype == np.float64 and d["cotangent:"]["y"].dtype == np.float64
    with pytest.raises(errors.MalformedMessage, match="dtype float64; the stage declares shape"):
        conform(StageSpec("s", (), (TensorSpec("x", (4,), "float32"),), ()), {}, {"x": np.ones(4)}, {})
    with StageServer(stage, token=TOKEN) as server, TcpTransport(*server.address, token=TOKEN) as t:
        remote = RemoteStage(t)
        y = remote.apply({"a": np.float32(2)}, {"x": np.ones(4, np.float32)})["y"]
        assert y.dtype == np.float64 and y.tolist() == [2.0] * 4
        g = remote.vjp({"a": np.float64(2)}, {"x": np.ones(4)}, {"y": np.ones(4, np.float32)})
        assert float(g["a"]) == 4.0


def test_the_jax_compile_cache_is_bounded(monkeypatch):
    import jacana.protocol.stage as stage_module

    monkeypatch.setattr(stage_module, "COMPILE_CACHE_SIZE", 3)
    stage = JaxStage(lambda p, i: {"y": p["a"] * i["x"]}, {"a": np.float32(1)}, {"x": np.ones(2, np.float32)})
    for n in range(1, 8):  # in process, a stage may still be called with other shapes
        assert stage.apply({"a": np.float32(2)}, {"x": np.ones(n, np.float32)})["y"].shape == (n,)
    assert len(stage._cache) == 3


# --- tokens -------------------------------------------------------------------------------------

def private_file(path, text):
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_token_files_that_are_not_private_regular_small_text_are_refused(tmp_path):
    good = private_file(tmp_path / "good", TOKEN + "\n")
    assert load_token(token_file=good) == TOKEN
    for mode, words in ((0o644, "readable by group and others"), (0o640, "readable by group"),
                        (0o604, "readable by others"), (0o620, "writable by group")):
        os.chmod(good, mode)
        with pytest.raises(errors.AuthenticationError) as info:
            load_token(token_file=good)
        assert good in str(info.value) and words in str(info.value) and f"{mode:04o}" in str(info.value)
        assert TOKEN not in str(info.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {"/dev/zero": "character device", str(tmp_path): "directory", str(fifo): "named pipe",
             private_file(tmp_path / "big", "x" * (MAX_TOKEN_FILE_BYTES + 1)): "bytes",
             private_file(tmp_path / "empty", "\n\n"): "empty",
             str(tmp_path / "absent"): "cannot read"}
    (tmp_path / "latin1").write_bytes(b"caf\xe9 " + TOKEN.encode())
    (tmp_path / "latin1").chmod(0o600)
    cases[str(tmp_path / "latin1")] = "UTF-8"
    for path, words in cases.items():
        t0 = time.monotonic()
        with pytest.raises(errors.AuthenticationError) as info:
            load_token(token_file=path)
        assert path in str(info.value) and words in str(info.value), str(info.value)
        assert time.monotonic() - t0 < 1


def test_cli_names_the_token_file_problem_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JACANA_STAGE_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "jacana.protocol.cli", "--stage", "jacana.protocol.stage:Stage",
                           "--token-file", "/dev/zero"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert "/dev/zero" in proc.stderr and "not a regular file" in proc.stderr


def test_a_token_with_a_lone_surrogate_gets_an_auth_error_not_a_reset():
    with StageServer(poly_stage(), token=TOKEN) as server:
        for token in ("\ud800" * 20, TOKEN[:-1] + "\udfff", "\x00" * 20):
            text = json.dumps({"protocol": "jacana-stage", "version": "1.0", "kind": "hello", "role": "request",
                               "tensors": [], "payload_nbytes": 0, "meta": {"token": token}}).encode()
            text += b" " * (-(8 + len(text)) % 8)
            with socket.create_connection(server.address) as s:
                s.sendall(frame(PREFIX.pack(MAGIC, len(text)) + text))
                reply = read_reply(s, 5)
                assert reply.kind == "error" and reply.meta["error"]["code"] == "auth"
        assert served_within(server.address) < 2.0  # and the server is fine
    for bad in ("\ud800" * 20, "control\x07characters-here"):
        with pytest.raises(errors.AuthenticationError, match="character"):
            TcpTransport("127.0.0.1", 1, token=bad)
        with pytest.raises(errors.AuthenticationError, match="JACANA_STAGE_TOKEN"):
            load_token(environ={"JACANA_STAGE_TOKEN": bad})


# --- memory per message -------------------------------------------------------------------------

MEMORY_SERVER = r"""
import resource, sys, threading, time, tracemalloc
import numpy as np
from jacana.protocol.server import StageServer
from jacana.protocol.stage import JaxStage, Stage, StageSpec, TensorSpec

n, kind = int(sys.argv[1]), sys.argv[2]

class Identity(Stage):
    stage_id = "identity"
    def describe(self, inputs=None):
        return StageSpec("identity", (), (TensorSpec("x", (n,), "float32"),), (TensorSpec("y", (n,), "float32"),))
    def apply(self, params, inputs):
        return {"y": inputs["x"]}
    def vjp(self, *args):
        return {}

def rss():  # resident now
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

if kind == "identity":
    stage = Identity()
else:
    import jax
    stage = JaxStage(lambda p, i: {"y": 2 * i["x"]}, {}, {"x": jax.ShapeDtypeStruct((n,), np.float32)})
srv = StageServer(stage, token=sys.argv[3], max_bytes=1 << 31, timeout=120).start()
tracemalloc.start()
base, high = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sampled = [base]
done = threading.Event()
def sample():
    while not done.wait(0.002):
        sampled[0] = max(sampled[0], rss())
threading.Thread(target=sample, daemon=True).start()
print(srv.address[1], flush=True)
sys.stdin.readline()
done.set()
end_high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = end_high if end_high > high else sampled[0]  # the high-water mark, unless set before we began
print(peak - base, tracemalloc.get_traced_memory()[1], flush=True)
srv.close()
"""


def server_peak_memory(nbytes: int, kind: str = "identity") -> tuple[int, int, float]:
    """(extra peak RSS, tracemalloc peak, seconds) of a server process answering one request whose
    tensor has ``nbytes`` (the ``identity`` stage answers a tensor as large; ``jax``: 2 * x)."""
    proc = subprocess.Popen([sys.executable, "-c", MEMORY_SERVER, str(nbytes // 4), kind, TOKEN],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        x = np.ones(nbytes // 4, np.float32)
        t0 = time.monotonic()
        with TcpTransport("127.0.0.1", port, token=TOKEN, timeout=120, max_bytes=1 << 31) as t:
            reply = t.request(Message("apply", {"x": x}))
        seconds = time.monotonic() - t0
        assert reply.kind == "apply" and reply.tensors["y"].shape == x.shape, reply.meta
        proc.stdin.write("\n")
        proc.stdin.flush()
        rss, traced = map(int, proc.stdout.readline().split())
        return rss, traced, seconds
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_message_is_held_in_memory_about_once():
    """A 64 MB request answered with a 64 MB response costs the server about one copy (old server:
    three: the pieces read, their join, the encoded answer, its frame)."""
    nbytes = 64_000_000
    rss, traced, _ = server_peak_memory(nbytes)
    assert traced < 1.3 * nbytes and rss < 1.5 * nbytes, (rss / nbytes, traced / nbytes)


if __name__ == "__main__":  # python tests/test_protocol_limits.py [MB]: the numbers in docs/reliability.md
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 200
    for kind in ("identity", "jax"):
        rss, traced, seconds = server_peak_memory(int(mb * 1e6), kind)
        print(f"{kind}: {mb:.0f} MB request -> server peak RSS +{rss / 1e6:.0f} MB ({rss / (mb * 1e6):.2f}x), "
              f"Python allocations peak {traced / 1e6:.0f} MB ({traced / (mb * 1e6):.2f}x), {seconds:.2f} s")
    with StageServer(poly_stage(), token=TOKEN, hello_timeout=2.0, max_pending=16, timeout=5.0) as server:
        results, attack = run_trickle_attack(server.address)
    print("trickle attack (48 connections):", [f"{r:.3f} s" if isinstance(r, float) else repr(r) for r in results],
          f"connects={attack.connects} drops={attack.drops}")
