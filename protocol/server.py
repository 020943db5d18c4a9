"""A network stage server and its client (TCP, length-prefixed frames).

Security model: binds to 127.0.0.1 unless told otherwise; every connection
must first send a ``hello`` request whose ``meta.token`` equals the server's
token (compared in constant time) or it is answered with an ``auth`` error and
closed; frames above ``max_bytes`` are refused before they are read; every
socket operation has a timeout; any malformed message is answered with an
``error`` message and the server keeps serving. Nothing is pickled.

The token comes from the caller, ``--token-file`` or ``$JACANA_STAGE_TOKEN``;
jacana never prints it or writes it anywhere.

    >>> import numpy as np
    >>> from jacana.protocol.stage import JaxStage
    >>> from jacana.protocol.rpc import RemoteStage
    >>> s = JaxStage(lambda p, i: {"y": p["a"] + 1}, {"a": np.float32(1)}, stage_id="inc")
    >>> with StageServer(s, token="correct horse battery staple") as server:
    ...     with TcpTransport(*server.address, token="correct horse battery staple") as t:
    ...         float(RemoteStage(t).apply({"a": np.float32(2)}, {})["y"])
    3.0
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
import time
from typing import Any, Mapping

from jacana.protocol.errors import AuthenticationError, MessageTooLarge, ProtocolError, TransportError
from jacana.protocol.message import Message, decode, encode
from jacana.protocol.rpc import error_message, handle_bytes, raise_if_error
from jacana.protocol.stage import Stage
from jacana.protocol.transport import DEFAULT_MAX_BYTES, Transport, frame, read_frame

TOKEN_ENV = "JACANA_STAGE_TOKEN"
MIN_TOKEN_LENGTH = 16


def load_token(token: str | None = None, token_file: str | None = None,
               environ: Mapping[str, str] | None = None) -> str:
    """The shared token: ``token``, else the first line of ``token_file``, else
    ``$JACANA_STAGE_TOKEN``. At least 16 characters. Never logged."""
    environ = os.environ if environ is None else environ
    if token is None and token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.readline().strip()
        except OSError as exc:
            raise AuthenticationError(f"cannot read token file {token_file!r}: {exc.strerror}") from None
    if token is None:
        token = environ.get(TOKEN_ENV)
    if not token:
        raise AuthenticationError(f"a token is required: pass one, use a token file, or set ${TOKEN_ENV}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthenticationError(f"the token must have at least {MIN_TOKEN_LENGTH} characters")
    return token


def _recv_some(sock: socket.socket):
    def read(n: int) -> bytes:
        try:
            return sock.recv(n)
        except socket.timeout:
            raise TransportError("socket timed out") from None
        except OSError as exc:
            raise TransportError(f"socket error: {exc}") from None
    return read


class StageServer:
    """Serve one stage over TCP. Use as a context manager, or ``start()``/``close()``.

    ``idle_exit`` (seconds): stop by itself after that long without a connection.
    """

    def __init__(self, stage: Stage, *, token: str | None = None, token_file: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout: float = 60.0, max_connections: int = 32, idle_exit: float | None = None) -> None:
        self.stage = stage
        self._token = load_token(token, token_file).encode("utf-8")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.idle_exit = idle_exit
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._active = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # lifecycle -----------------------------------------------------------
    def start(self) -> "StageServer":
        self._thread = threading.Thread(target=self.serve_forever, name="jacana-stage-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wake connection threads blocked in recv
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "StageServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                with self._lock:
                    idle = self._active == 0 and time.monotonic() - self._last
                if self.idle_exit is not None and idle and idle > self.idle_exit:
                    self._stop.set()
                continue
            except OSError:
                break
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            with self._lock:
                self._active += 1
                self._conns.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()
        try:
            self._sock.close()
        except OSError:
            pass

    # one connection --------------------------------------------------------
    def _send(self, conn: socket.socket, msg_bytes: bytes) -> None:
        conn.sendall(frame(msg_bytes))

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.timeout)
            read = _recv_some(conn)
            if not self._authenticate(conn, read):
                return
            while not self._stop.is_set():
                try:
                    data = read_frame(read, self.max_bytes)
                except MessageTooLarge as exc:
                    self._send(conn, encode(error_message(exc)))
                    return  # the stream cannot be resynchronised
                if data is None:
                    return
                self._send(conn, handle_bytes(self.stage, data, max_bytes=self.max_bytes))
        except (ProtocolError, OSError):
            pass  # timeouts, truncation, peer gone: drop the connection
        except Exception:  # never let a connection take the server down
            pass
        finally:
            try:
                conn.close()
            finally:
                with self._lock:
                    self._active -= 1
                    self._conns.discard(conn)
                    self._last = time.monotonic()
                self._slots.release()

    def _authenticate(self, conn: socket.socket, read) -> bool:
        refusal = AuthenticationError("the first message must be a hello with the right token")
        try:
            data = read_frame(read, min(self.max_bytes, 1 << 16))
            if data is None:
                return False
            hello = decode(data)
            given = hello.meta.get("token") if hello.kind == "hello" and hello.role == "request" else None
            ok = isinstance(given, str) and hmac.compare_digest(given.encode("utf-8"), self._token)
        except ProtocolError:
            ok = False
        if not ok:
            self._send(conn, encode(error_message(refusal)))
            return False
        reply = Message("hello", role="response", stage=self.stage.stage_id,
                        meta={"stage": self.stage.stage_id, "max_bytes": self.max_bytes})
        self._send(conn, encode(reply))
        return True


class TcpTransport(Transport):
    """Client side: one authenticated connection, one request at a time (thread-safe)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 token_file: str | None = None, timeout: float = 60.0, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.host, self.port = host, port
        self._token = load_token(token, token_file)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.server_meta: Mapping[str, Any] = {}

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        try:
            sock.sendall(frame(encode(Message("hello", meta={"token": self._token}))))
            data = read_frame(_recv_some(sock), self.max_bytes)
            if data is None:
                raise TransportError("server closed the connection during hello")
            reply = raise_if_error(decode(data))
            if reply.kind != "hello":
                raise TransportError(f"expected a hello reply, got {reply.kind}")
            self.server_meta = dict(reply.meta)
        except BaseException:
            sock.close()
            raise
        return sock

    def request_bytes(self, data: bytes) -> bytes:
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            try:
                self._sock.sendall(frame(data))
                out = read_frame(_recv_some(self._sock), self.max_bytes)
                if out is None:
                    raise TransportError("server closed the connection")
                return out
            except (ProtocolError, OSError) as exc:
                self._sock.close()
                self._sock = None
                if isinstance(exc, ProtocolError):
                    raise
                raise TransportError(f"connection to {self.host}:{self.port} failed: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
