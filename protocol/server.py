"""A network stage server and its client (TCP, length-prefixed frames).

Security model: binds to 127.0.0.1 unless told otherwise; every connection
must first send a ``hello`` request whose ``meta.token`` equals the server's
token (compared in constant time) or it is answered with an ``auth`` error and
closed; every socket operation has a timeout; any malformed message is answered
with an ``error`` message and the server keeps serving. Nothing is pickled.

Limits (each a constructor argument and a ``jacana serve-stage`` option):

* **Before authentication** a connection costs no thread: one selector loop reads
  the hellos of at most ``max_pending`` connections at once (the oldest is closed
  to admit a new one), each within ``hello_timeout`` seconds from its connection
  and in a frame of at most :data:`HELLO_MAX_BYTES`; a longer frame is refused
  before it is read. Connections without the token therefore never hold one of
  the ``max_connections`` slots, and cannot keep a client with the token out.
* **After authentication**: at most ``max_connections`` connections (a further
  client is answered ``server busy``), each closed after ``idle_timeout`` seconds
  without a request; a frame must arrive within ``timeout`` seconds plus one
  second per MiB; frames above ``max_bytes`` are refused before they are read.
* **Memory**: at most ``max_inflight_bytes`` of requests are received or served at
  once (a request waits up to ``timeout`` for room, then is answered ``server
  busy``); a request is read into one buffer, decoded without copying, and the
  response is written from the output arrays' own memory.
* **Signature**: a request's tensors must be those of the stage's declared
  signature (:func:`jacana.protocol.rpc.conform`), or it is answered ``malformed``;
  nothing is compiled for shapes or dtypes the stage does not declare.

The token comes from the caller, ``--token-file`` (a private regular file of at
most :data:`MAX_TOKEN_FILE_BYTES` bytes) or ``$JACANA_STAGE_TOKEN``; jacana never
prints it or writes it anywhere.

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
import selectors
import socket
import stat
import threading
import time
import unicodedata
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from jacana.protocol.errors import AuthenticationError, MessageTooLarge, ProtocolError, TransportError
from jacana.protocol.message import MAGIC, PREFIX, Message, decode, encode_parts
from jacana.protocol.rpc import error_message, handle_parts, raise_if_error
from jacana.protocol.stage import Stage
from jacana.protocol.transport import DEFAULT_MAX_BYTES, FRAME, Transport, frame, frame_parts, read_frame

TOKEN_ENV = "JACANA_STAGE_TOKEN"
MIN_TOKEN_LENGTH = 16
#: A token file larger than this is refused unread (``/dev/zero``, a log file, a mistaken path).
MAX_TOKEN_FILE_BYTES = 4096
#: The largest frame read before a connection has authenticated (a hello is about 200 bytes).
HELLO_MAX_BYTES = 1 << 16
#: Default budget of request bytes received or served at once (at least ``max_bytes``).
DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30
#: The slowest upload accepted within one frame (bytes per second), on top of ``timeout``.
MIN_RATE = 1 << 20
#: How long a refused connection is drained before it is closed (so that the peer reads the
#: refusal instead of a reset caused by its own unread bytes).
LINGER_S = 1.0
_ALIGN = 64  # where XLA's CPU client uses a host buffer without copying it

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def _file_kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _access_words(mode: int) -> str:
    """E.g. ``readable by group and others`` for mode 0644."""
    words = []
    for what, group_bit in (("readable", 0o040), ("writable", 0o020), ("executable", 0o010)):
        who = [w for w, bit in (("group", group_bit), ("others", group_bit >> 3)) if mode & bit]
        if who:
            words.append(f"{what} by {' and '.join(who)}")
    return ", ".join(words)


def read_token_file(path: str) -> str:
    """The first line of the token file ``path``, stripped.

    Refused with an :class:`AuthenticationError` naming the file and the problem when it cannot
    be opened, is not a regular file (a directory, ``/dev/zero``, a pipe), is readable or writable
    by group or others (POSIX; ``chmod 600`` it), is larger than :data:`MAX_TOKEN_FILE_BYTES`, or is
    not UTF-8 text. Nothing more than that many bytes is ever read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError, TypeError) as exc:
        raise AuthenticationError(f"cannot read token file {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuthenticationError(f"token file {path!r} is not a regular file: it is {_file_kind(st.st_mode)}")
        if os.name == "posix" and st.st_mode & 0o077:
            raise AuthenticationError(
                f"token file {path!r} is {_access_words(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"a token file must be private: chmod 600 {path}")
        if st.st_size > MAX_TOKEN_FILE_BYTES:
            raise AuthenticationError(f"token file {path!r} has {st.st_size} bytes; a token file holds one line "
                                      f"of at most {MAX_TOKEN_FILE_BYTES} bytes")
        data = b""
        while len(data) <= MAX_TOKEN_FILE_BYTES:
            chunk = os.read(fd, MAX_TOKEN_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise AuthenticationError(f"cannot read token file {path!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise AuthenticationError(f"token file {path!r} has more than {MAX_TOKEN_FILE_BYTES} bytes; a token file "
                                  f"holds one line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthenticationError(f"token file {path!r} is not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise AuthenticationError(f"token file {path!r} is empty: its first line must hold the token")
    return token


def check_token(token: Any, source: str = "the token") -> str:
    """``token`` if it can be a token: text of at least 16 characters, no control character,
    encodable as UTF-8 (no lone surrogate). The error never quotes the token."""
    if not isinstance(token, str):
        raise AuthenticationError(f"{source} must be text, not {type(token).__name__}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthenticationError(f"{source}: the token must have at least {MIN_TOKEN_LENGTH} characters")
    try:
        token.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AuthenticationError(f"{source}: character {exc.start} of the token is not valid text "
                                  f"(a lone surrogate)") from None
    bad = next((i for i, c in enumerate(token) if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise AuthenticationError(f"{source}: character {bad} of the token is a control character")
    return token


def load_token(token: str | None = None, token_file: str | None = None,
               environ: Mapping[str, str] | None = None) -> str:
    """The shared token: ``token``, else the first line of ``token_file`` (:func:`read_token_file`),
    else ``$JACANA_STAGE_TOKEN``; checked by :func:`check_token`. Never logged."""
    environ = os.environ if environ is None else environ
    source = "the token"
    if token is None and token_file is not None:
        token, source = read_token_file(token_file), f"token file {token_file!r}"
    if token is None:
        token, source = environ.get(TOKEN_ENV), f"${TOKEN_ENV}"
    if not token:
        raise AuthenticationError(f"a token is required: pass one, use a token file, or set ${TOKEN_ENV}")
    return check_token(token, source)


def _recv_some(sock: socket.socket):
    def read(n: int) -> bytes:
        try:
            return sock.recv(n)
        except socket.timeout:
            raise TransportError("socket timed out") from None
        except OSError as exc:
            raise TransportError(f"socket error: {exc}") from None
    return read


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class _ByteBudget:
    """Bytes of requests in flight, shared by all connections."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.used + n > self.total:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Hello:
    """A connection that has not authenticated yet: what it has sent of its first frame."""

    __slots__ = ("buf", "size", "deadline")

    def __init__(self, deadline: float) -> None:
        self.buf = bytearray()
        self.size: int | None = None
        self.deadline = deadline



def _recv_ready(conn: socket.socket, size: int) -> bytes | None:
    """Up to ``size`` bytes from a non-blocking socket: None if nothing is ready yet, ``b""`` when the
    peer closed or the connection failed."""
    try:
        return conn.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""

class StageServer:
    """Serve one stage over TCP. Use as a context manager, or ``start()``/``close()``.

    ``max_connections``: authenticated connections at once; ``max_pending``: connections
    waiting to authenticate; ``hello_timeout``: seconds from connecting to a complete hello;
    ``idle_timeout``: seconds an authenticated connection may wait between requests;
    ``timeout``: seconds for any socket operation (and, plus one second per MiB, for a frame);
    ``max_inflight_bytes``: request bytes received or served at once (default
    :data:`DEFAULT_MAX_INFLIGHT_BYTES`, at least ``max_bytes``); ``check_signature``: refuse
    tensors outside the stage's declared signature; ``idle_exit`` (seconds): stop by itself after
    that long without an authenticated connection.
    """

    def __init__(self, stage: Stage, *, token: str | None = None, token_file: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout: float = 60.0, max_connections: int = 32, idle_exit: float | None = None,
                 hello_timeout: float = 5.0, idle_timeout: float = 300.0, max_pending: int = 64,
                 max_inflight_bytes: int | None = None, check_signature: bool = True) -> None:
        for name, value in (("timeout", timeout), ("hello_timeout", hello_timeout), ("idle_timeout", idle_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        for name, value in (("max_connections", max_connections), ("max_pending", max_pending), ("max_bytes", max_bytes)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        inflight = max(DEFAULT_MAX_INFLIGHT_BYTES, max_bytes) if max_inflight_bytes is None else max_inflight_bytes
        if type(inflight) is not int or inflight < max_bytes:
            raise ValueError(f"max_inflight_bytes ({inflight!r}) must be an integer of at least max_bytes ({max_bytes})")
        self.stage = stage
        self._token = load_token(token, token_file).encode("utf-8")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_inflight_bytes = inflight
        self.check_signature = check_signature
        self.idle_exit = idle_exit
        self._budget = _ByteBudget(inflight)
        self._stop = threading.Event()
        self._active = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, port))
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

    @property
    def active_connections(self) -> int:
        """Authenticated connections being served now."""
        with self._lock:
            return self._active

    # the accept and hello loop: one thread, no blocking call ----------------
    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        pending: OrderedDict[socket.socket, _Hello] = OrderedDict()  # in order of arrival = of deadline
        lingering: OrderedDict[socket.socket, float] = OrderedDict()
        try:
            self._sock.setblocking(False)
            sel.register(self._sock, selectors.EVENT_READ, "listen")
            while not self._stop.is_set():
                now = time.monotonic()
                wait = 0.2
                for table in (pending, lingering):
                    if table:
                        first = next(iter(table.values()))
                        wait = min(wait, max(0.0, (first.deadline if isinstance(first, _Hello) else first) - now))
                for key, _ in sel.select(wait):
                    if key.data == "listen":
                        self._accept(sel, pending, lingering)
                        continue
                    try:
                        if key.data == "linger":
                            self._drain(sel, lingering, key.fileobj)
                        else:
                            self._read_hello(sel, pending, lingering, key.fileobj)
                    except Exception:  # one bad connection never stops the loop
                        for table in (pending, lingering):
                            self._forget(sel, table, key.fileobj)
                now = time.monotonic()
                while pending and next(iter(pending.values())).deadline <= now:
                    conn = next(iter(pending))
                    self._refuse(sel, pending, lingering, conn,
                                 AuthenticationError(f"no complete hello within {self.hello_timeout} s"))
                while lingering and next(iter(lingering.values())) <= now:
                    self._forget(sel, lingering, next(iter(lingering)))
                if self.idle_exit is not None:
                    with self._lock:
                        idle = self._active == 0 and now - self._last > self.idle_exit
                    if idle:
                        self._stop.set()
        except OSError:
            pass  # the listening socket was closed under us
        finally:
            for table in (pending, lingering):
                for conn in list(table):
                    self._forget(sel, table, conn)
            sel.close()
            try:
                self._sock.close()
            except OSError:
                pass

    @staticmethod
    def _unwatch(sel: selectors.BaseSelector, table: dict, conn: socket.socket) -> None:
        """Stop tracking ``conn`` (in ``table`` and the selector); the socket stays open."""
        table.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError, OSError):
            pass

    @classmethod
    def _forget(cls, sel: selectors.BaseSelector, table: dict, conn: socket.socket) -> None:
        cls._unwatch(sel, table, conn)
        try:
            conn.close()
        except OSError:
            pass

    def _accept(self, sel, pending, lingering) -> None:
        for _ in range(64):  # what is queued, in bounded batches
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: let the loop breathe
                time.sleep(0.05)
                return
            conn.setblocking(False)
            _nodelay(conn)
            while len(pending) >= self.max_pending:  # the oldest hello-less connection makes room
                self._refuse(sel, pending, lingering, next(iter(pending)),
                             AuthenticationError("too many connections are waiting to authenticate"))
            pending[conn] = _Hello(time.monotonic() + self.hello_timeout)
            sel.register(conn, selectors.EVENT_READ, "hello")
            self._read_hello(sel, pending, lingering, conn)  # a client's hello often came with it

    def _read_hello(self, sel, pending, lingering, conn: socket.socket) -> None:
        h = pending.get(conn)
        if h is None:
            return
        want = FRAME.size - len(h.buf) if h.size is None else FRAME.size + h.size - len(h.buf)
        chunk = _recv_ready(conn, want)  # never more than the hello frame: what follows is the next request
        if chunk is None:
            return
        if not chunk:
            self._forget(sel, pending, conn)
            return
        h.buf += chunk
        if h.size is None and len(h.buf) == FRAME.size:
            (h.size,) = FRAME.unpack(h.buf)
            limit = min(self.max_bytes, HELLO_MAX_BYTES)
            if h.size > limit:
                self._refuse(sel, pending, lingering, conn, MessageTooLarge(
                    f"frame of {h.size} bytes before the hello; the limit before authentication is {limit}"))
                return
        if h.size is not None and len(h.buf) == FRAME.size + h.size:
            pending.pop(conn)
            sel.unregister(conn)
            self._admit(sel, lingering, conn, bytes(h.buf[FRAME.size:]))

    def _token_matches(self, data: bytes) -> bool:
        try:
            hello = decode(data)
        except Exception:  # ProtocolError by contract; anything else is no hello either
            return False
        if hello.kind != "hello" or hello.role != "request":
            return False
        given = hello.meta.get("token")
        if not isinstance(given, str):
            return False
        # surrogatepass: a lone surrogate (valid JSON, not valid UTF-8) is a wrong token, not a crash
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self._token)

    def _admit(self, sel, lingering, conn: socket.socket, data: bytes) -> None:
        if not self._token_matches(data):
            self._refuse(sel, {}, lingering, conn,
                         AuthenticationError("the first message must be a hello with the right token"))
            return
        with self._lock:
            busy = self._active >= self.max_connections
            if not busy:
                self._active += 1
                self._conns.add(conn)
        if busy:
            self._refuse(sel, {}, lingering, conn, TransportError(
                f"server busy: all {self.max_connections} connections are in use; retry later"))
            return
        try:
            threading.Thread(target=self._serve_connection, args=(conn,), name="jacana-stage-connection",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: as busy as can be
            with self._lock:
                self._active -= 1
                self._conns.discard(conn)
            self._refuse(sel, {}, lingering, conn, TransportError("server busy: cannot start a thread; retry later"))

    def _refuse(self, sel, table: dict, lingering, conn: socket.socket, exc: ProtocolError) -> None:
        """Answer ``exc`` (best effort, never blocking), stop writing, and drain what the peer
        still sends for up to :data:`LINGER_S` before closing (closing with unread bytes would
        reset the connection and could destroy the answer before the peer reads it)."""
        self._unwatch(sel, table, conn)
        try:
            conn.setblocking(False)
            conn.send(frame(b"".join(encode_parts(error_message(exc)))))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._forget(sel, {}, conn)
            return
        while len(lingering) >= self.max_pending:
            self._forget(sel, lingering, next(iter(lingering)))
        lingering[conn] = time.monotonic() + LINGER_S
        sel.register(conn, selectors.EVENT_READ, "linger")

    def _drain(self, sel, lingering, conn: socket.socket) -> None:
        more = _recv_ready(conn, 1 << 16)
        if more is None:
            return
        if not more:
            self._forget(sel, lingering, conn)

    # one authenticated connection: its own thread, blocking calls with deadlines
    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(self.timeout)
            reply = Message("hello", role="response", stage=self.stage.stage_id,
                            meta={"stage": self.stage.stage_id, "max_bytes": self.max_bytes,
                                  "idle_timeout": self.idle_timeout})
            self._send(conn, encode_parts(reply))
            while not self._stop.is_set():
                n = self._next_frame_length(conn)
                if n is None:
                    return
                if n > self.max_bytes:
                    self._send(conn, encode_parts(error_message(
                        MessageTooLarge(f"frame of {n} bytes exceeds the limit of {self.max_bytes}"))))
                    self._linger(conn)
                    return  # the stream cannot be resynchronised
                deadline = time.monotonic() + self.timeout + n / MIN_RATE
                if not self._budget.acquire(n, self.timeout):
                    self._skip(conn, n, deadline)
                    self._send(conn, encode_parts(error_message(TransportError(
                        f"server busy: {self.max_inflight_bytes} bytes of requests in flight; retry later"))))
                    continue
                try:
                    data = self._recv_message(conn, n, deadline)
                    parts = handle_parts(self.stage, data, max_bytes=self.max_bytes,
                                         check_signature=self.check_signature)
                    del data  # the response may still hold views of it (parts), nothing else does
                    self._send(conn, parts)
                    del parts
                finally:
                    self._budget.release(n)
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

    @staticmethod
    def _send(conn: socket.socket, parts: Sequence[Any]) -> None:
        for buf in frame_parts(parts):
            conn.sendall(buf)

    def _next_frame_length(self, conn: socket.socket) -> int | None:
        """The length of the next frame; ``None`` at a clean end or after ``idle_timeout`` idle."""
        conn.settimeout(self.idle_timeout)
        try:
            first = conn.recv(FRAME.size)
        except socket.timeout:
            return None  # idle: closed silently (an answer now would be read as the next reply)
        if not first:
            return None
        conn.settimeout(self.timeout)
        head = first + self._recv_exact(conn, FRAME.size - len(first), time.monotonic() + self.timeout)
        return FRAME.unpack(head)[0]

    def _recv_into(self, conn: socket.socket, view: memoryview, deadline: float) -> None:
        n, got = len(view), 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"{n} bytes not received in time ({got} came)")
            conn.settimeout(min(self.timeout, remaining))
            k = conn.recv_into(view[got:], min(n - got, 1 << 20))
            if not k:
                raise TransportError(f"connection closed after {got} of {n} bytes")
            got += k

    def _recv_exact(self, conn: socket.socket, n: int, deadline: float) -> bytes:
        buf = bytearray(n)
        self._recv_into(conn, memoryview(buf), deadline)
        return bytes(buf)

    def _recv_message(self, conn: socket.socket, n: int, deadline: float) -> memoryview:
        """A frame's ``n`` bytes, read once into one buffer whose payload starts 64-byte aligned
        (so that JAX uses the first tensor in place instead of copying it). Memory is only
        committed as bytes arrive."""
        raw = np.empty(n + _ALIGN, np.uint8)
        view = memoryview(raw)
        first = min(n, PREFIX.size)
        head = self._recv_exact(conn, first, deadline)
        shift = 0
        if first == PREFIX.size and head[:4] == MAGIC:
            shift = -(raw.ctypes.data + PREFIX.size + PREFIX.unpack(head)[1]) % _ALIGN
        view[shift : shift + first] = head
        self._recv_into(conn, view[shift + first : shift + n], deadline)
        return view[shift : shift + n]

    def _skip(self, conn: socket.socket, n: int, deadline: float) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            if time.monotonic() > deadline:
                raise TransportError("frame not received in time")
            conn.settimeout(self.timeout)
            k = conn.recv_into(scratch, min(n, len(scratch)))
            if not k:
                raise TransportError("connection closed within a frame")
            n -= k

    @staticmethod
    def _linger(conn: socket.socket) -> None:
        try:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(LINGER_S)
            end = time.monotonic() + LINGER_S
            while time.monotonic() < end and conn.recv(1 << 16):
                pass
        except OSError:
            pass


class TcpTransport(Transport):
    """Client side: one authenticated connection, one request at a time (thread-safe).

    A request on a connection the server has since closed (e.g. after its idle timeout) is sent
    again once on a new connection; stage calls are pure, so this is safe."""

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
        _nodelay(sock)
        try:
            sock.sendall(frame(b"".join(encode_parts(Message("hello", meta={"token": self._token})))))
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

    def _exchange(self, parts: Sequence[Any]) -> bytes | bytearray:
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect()
                sock, got = self._sock, 0
                try:
                    for buf in frame_parts(parts):
                        sock.sendall(buf)

                    def read(n: int) -> bytes:
                        nonlocal got
                        chunk = sock.recv(n)
                        got += len(chunk)
                        return chunk

                    out = read_frame(read, self.max_bytes)
                    if out is None:
                        raise ConnectionResetError("server closed the connection")
                    return out
                except (ProtocolError, OSError) as exc:
                    sock.close()
                    self._sock = None
                    stale = not fresh and got == 0 and isinstance(exc, (ConnectionError, BrokenPipeError))
                    if stale and attempt == 0:
                        continue  # the server had closed this connection: once more on a new one
                    if isinstance(exc, ProtocolError):
                        raise
                    if isinstance(exc, socket.timeout):
                        raise TransportError(f"{self.host}:{self.port} did not answer within {self.timeout} s") from None
                    raise TransportError(f"connection to {self.host}:{self.port} failed: {exc}") from None
        raise AssertionError("unreachable")

    def request_bytes(self, data: bytes) -> bytes | bytearray:
        return self._exchange([data])

    def request(self, msg: Message) -> Message:
        # the tensors go out from their own memory: no joined copy of the message
        return decode(self._exchange(encode_parts(msg)), max_bytes=self.max_bytes)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
