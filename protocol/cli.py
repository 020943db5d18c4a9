"""``jacana serve-stage``: serve a stage over TCP.

``register(subparsers)`` adds the subcommand to jacana's CLI; the same options
work with ``python -m jacana.protocol.cli``. The server prints one line,
``jacana serve-stage: serving '<stage>' on <host>:<port>``, once it listens.
"""

from __future__ import annotations

import argparse
import sys

from jacana.protocol.errors import JacanaError, StageError
from jacana.protocol.transport import DEFAULT_MAX_BYTES


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, help="stage factory as 'package.module:callable'")
    p.add_argument("--stage-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument (a string) for the factory; repeat for several")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, localhost only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port, printed at start)")
    p.add_argument("--token-file", default=None,
                   help="file whose first line is the token (default: $JACANA_STAGE_TOKEN)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest accepted message in bytes")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="socket timeout in seconds (a frame may take this plus one second per MiB)")
    p.add_argument("--hello-timeout", type=float, default=5.0,
                   help="seconds a new connection has to authenticate (default 5)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close an authenticated connection after this many seconds without a request (default 300)")
    p.add_argument("--max-connections", type=int, default=32, help="authenticated connections at once (default 32)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="connections waiting to authenticate at once; the oldest makes room (default 64)")
    p.add_argument("--max-inflight-bytes", type=int, default=None,
                   help="bytes of requests received or served at once (default 1 GiB, at least --max-bytes)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many seconds without a connection")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve-stage`` to an argparse subparsers object."""
    p = subparsers.add_parser("serve-stage", help="serve a jacana stage over TCP (token required)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p)
    p.set_defaults(func=run_serve_stage)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jacana.protocol.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p)
    return p


def run_serve_stage(args: argparse.Namespace) -> int:
    """Load the stage, bind, print the address, serve until interrupted or idle."""
    from jacana.protocol.server import StageServer
    from jacana.protocol.stage import load_stage

    try:
        kwargs = {}
        for item in args.stage_arg:
            key, sep, value = item.partition("=")
            if not sep or not key.isidentifier():
                raise StageError(f"--stage-arg {item!r} is not KEY=VALUE")
            kwargs[key] = value
        stage = load_stage(args.stage, **kwargs)
        server = StageServer(stage, token_file=args.token_file, host=args.host, port=args.port,
                             max_bytes=args.max_bytes, timeout=args.timeout, idle_exit=args.idle_exit,
                             hello_timeout=args.hello_timeout, idle_timeout=args.idle_timeout,
                             max_connections=args.max_connections, max_pending=args.max_pending,
                             max_inflight_bytes=args.max_inflight_bytes)
    except (JacanaError, OSError, ValueError) as exc:
        print(f"jacana serve-stage: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"jacana serve-stage: warning: listening on {args.host}, reachable beyond this machine",
              file=sys.stderr)
    host, port = server.address
    print(f"jacana serve-stage: serving {stage.stage_id!r} on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jacana.protocol.cli --stage module:factory ...``"""
    return run_serve_stage(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
