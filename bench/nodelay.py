"""uvicorn's multi-worker launch with Nagle's algorithm off, for the benchmark's peer servers.

uvicorn releases before the fix of its issue #3149 bind the socket they share among workers
without IPPROTO_TCP, so asyncio does not set TCP_NODELAY on its connections, and every answer on
a kept-alive connection waits about 40 ms for the client's delayed ACK. LitServe binds its
socket through uvicorn's Config too. A peer slowed by that would flatter us: each peer here
binds its socket declared TCP, whatever the uvicorn release.
"""

from __future__ import annotations

import argparse
import os
import socket

from uvicorn import Config
from uvicorn.supervisors import Multiprocess

_bind = Config.bind_socket  # uvicorn's own, kept for tcp_listener once declare_tcp() has replaced it


def tcp_listener(config: Config) -> socket.socket:
    """uvicorn's listening socket, declared TCP: asyncio then sets TCP_NODELAY on each connection."""
    bound = _bind(config)
    return socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, fileno=bound.detach())


def serve(app: str, port: int, workers: int) -> None:
    """`uvicorn APP --workers N` on 127.0.0.1, sharing one TCP_NODELAY socket."""
    config = Config(app, host="127.0.0.1", port=port, workers=workers)
    Multiprocess(config, sockets=[tcp_listener(config)]).run()


def main(app: str, description: str) -> None:
    """A peer's command line: --port, --workers; each worker reads the worker count from BENCH_WORKERS."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ["BENCH_WORKERS"] = str(args.workers)
    serve(app, args.port, args.workers)


def declare_tcp() -> None:
    """Make every later uvicorn Config bind its socket as tcp_listener does (for servers that bind their own, as LitServe)."""
    Config.bind_socket = tcp_listener
