"""Transports carry encoded messages: in-process, dask, a subprocess, (TCP in server.py).

Every transport has ``request(msg) -> msg`` built on ``request_bytes(bytes) -> bytes``,
so what crosses a boundary is always the encoded message and nothing else.
On streams (pipes, sockets) each message is one *frame*: a u64 little-endian
length, then that many bytes.

    >>> import numpy as np
    >>> from jacana.protocol.stage import JaxStage
    >>> from jacana.protocol.message import Message
    >>> s = JaxStage(lambda p, i: {"y": 2 * p["a"]}, params={"a": np.float32(1)}, stage_id="double")
    >>> InProcessTransport(s).request(Message("apply", {"a": np.float32(4)}, param_names=("a",))).tensors["y"]
    array(8., dtype=float32)
"""

from __future__ import annotations

import functools
import os
import selectors
import struct
import subprocess
import time
from typing import Any, Callable, Sequence

from jacana.protocol.errors import MessageTooLarge, TransportError, TruncatedMessage
from jacana.protocol.message import Message, decode, encode
from jacana.protocol.rpc import handle_bytes
from jacana.protocol.stage import Stage, load_stage

FRAME = struct.Struct("<Q")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


#: Below this size a frame is read in one piece and written as one buffer.
_SMALL = 1 << 16


def frame(data: bytes) -> bytes:
    """Prefix ``data`` with its u64 little-endian length."""
    return FRAME.pack(len(data)) + data


def frame_parts(parts: Sequence[Any]) -> list[Any]:
    """The buffers of one frame holding the concatenation of ``parts`` (e.g.
    :func:`~jacana.protocol.message.encode_parts`): the length first, small buffers coalesced,
    large ones left as they are (no copy of the tensors)."""
    views = [memoryview(p).cast("B") for p in parts]
    out: list[Any] = []
    small = bytearray(FRAME.pack(sum(len(v) for v in views)))
    for v in views:
        if len(v) < _SMALL:
            small += v
            continue
        out.append(bytes(small))
        small = bytearray()
        out.append(v)
    if small:
        out.append(bytes(small))
    return [b for b in out if len(b)]


def read_exact(read_some: Callable[[int], bytes], n: int, what: str = "frame") -> bytes | bytearray:
    """Read exactly ``n`` bytes with ``read_some`` (b"" means end of stream).

    A large read fills one preallocated buffer (a :class:`bytearray`): the message is in
    memory once, not once in pieces and again joined."""
    if n <= _SMALL:
        chunks, got = [], 0
        while got < n:
            chunk = read_some(n - got)
            if not chunk:
                raise TruncatedMessage(f"stream closed after {got} of {n} bytes of a {what}")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        chunk = read_some(min(n - got, 1 << 20))
        if not chunk:
            raise TruncatedMessage(f"stream closed after {got} of {n} bytes of a {what}")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buf


def read_frame(read_some: Callable[[int], bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | bytearray | None:
    """Read one frame; ``None`` on a clean end of stream before a frame starts."""
    first = read_some(FRAME.size)
    if not first:
        return None
    head = first + (read_exact(read_some, FRAME.size - len(first), "frame length") if len(first) < FRAME.size else b"")
    (n,) = FRAME.unpack(head)
    if n > max_bytes:
        raise MessageTooLarge(f"frame of {n} bytes exceeds the limit of {max_bytes}")
    return read_exact(read_some, n)


class Transport:
    """Base transport: subclasses implement :meth:`request_bytes`."""

    max_bytes: int = DEFAULT_MAX_BYTES

    def request_bytes(self, data: bytes) -> bytes:
        raise NotImplementedError

    def request(self, msg: Message) -> Message:
        return decode(self.request_bytes(encode(msg)), max_bytes=self.max_bytes)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InProcessTransport(Transport):
    """Serve a local stage; messages still go through encode/decode."""

    def __init__(self, stage: Stage, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.stage = stage
        self.max_bytes = max_bytes

    def request_bytes(self, data: bytes) -> bytes:
        return handle_bytes(self.stage, data, max_bytes=self.max_bytes)


@functools.lru_cache(maxsize=64)
def _cached_stage(ref: str) -> Stage:
    return load_stage(ref)


def serve_task(target: Any, data: bytes) -> bytes:
    """Module-level task for dask: serve ``data`` with ``target`` and answer bytes.

    ``target`` is a ``"module:factory"`` reference (the stage is loaded once per worker process),
    a :class:`Stage`, or an object that serves messages itself (``target.serve_bytes(data)``:
    the dask executor's worker-resident shards, which add their provenance and ledger)."""
    if isinstance(target, str):
        try:
            target = _cached_stage(target)
        except Exception as exc:
            from jacana.protocol.rpc import error_message

            return encode(error_message(exc))
    if hasattr(target, "serve_bytes"):
        return target.serve_bytes(data)
    return handle_bytes(target, data)


def handle_ref(stage_ref: str, data: bytes) -> bytes:
    """:func:`serve_task` for a stage reference (the task name SPEC.md gives)."""
    return serve_task(stage_ref, data)


class DaskTransport(Transport):
    """Send encoded messages as dask tasks calling :func:`serve_task` on ``target``.

    ``target``: a stage reference (``"module:factory"``), or, with a ``distributed.Client``, a
    future of an object living on a worker (a stage, or anything with ``serve_bytes``: only the
    message bytes travel, the object stays where it is). With a client the task is
    ``client.submit(serve_task, target, data)``; without one, ``dask.delayed`` on the default
    scheduler. This is jacana's one dask path: the dask executor's shards are served through it.
    """

    def __init__(self, target: Any, client: Any = None, *, timeout: float | None = 600.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, **submit_kwargs: Any) -> None:
        self.target = target
        self.stage_ref = target if isinstance(target, str) else None
        self.client = client
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.submit_kwargs = submit_kwargs

    def submit(self, data: bytes, **submit_kwargs: Any) -> Any:
        """Submit without waiting (distributed only); returns a future of bytes."""
        if self.client is None:
            raise TransportError("submit needs a distributed Client")
        return self.client.submit(serve_task, self.target, data, pure=False, **{**self.submit_kwargs, **submit_kwargs})

    def request_bytes(self, data: bytes) -> bytes:
        try:
            if self.client is not None:
                out = self.submit(data).result(timeout=self.timeout)
            else:
                import dask

                out = dask.delayed(serve_task, pure=False)(self.target, data).compute()
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(f"dask task for {self.target!r:.80} failed: {exc}") from exc
        if not isinstance(out, (bytes, bytearray)):
            raise TransportError(f"dask task returned {type(out).__name__}, not bytes")
        return bytes(out)


class SubprocessTransport(Transport):
    """Talk to a peer process (any language) over its stdin/stdout, one frame each way.

    The pipe is private to the two processes, so no token is exchanged. Reads
    time out after ``timeout`` seconds; the process is terminated on :meth:`close`.
    """

    def __init__(self, argv: Sequence[str], *, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_BYTES,
                 env: dict[str, str] | None = None) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        try:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError as exc:
            raise TransportError(f"cannot start peer {argv!r}: {exc}") from exc
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def _read_some(self, n: int, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._sel.select(remaining):
            raise TransportError(f"peer {self.proc.args!r} did not answer within {self.timeout} s")
        return os.read(self.proc.stdout.fileno(), n)

    def request_bytes(self, data: bytes) -> bytes:
        if self.proc.poll() is not None:
            raise TransportError(f"peer {self.proc.args!r} exited with status {self.proc.returncode}")
        try:
            self.proc.stdin.write(frame(data))
            self.proc.stdin.flush()
        except OSError as exc:
            raise TransportError(f"cannot write to peer {self.proc.args!r}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        out = read_frame(lambda n: self._read_some(n, deadline), self.max_bytes)
        if out is None:
            raise TransportError(f"peer {self.proc.args!r} closed its output")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._sel.close()
        if self.proc.stdout:
            self.proc.stdout.close()
