"""The benchmarks' own machinery, where a mistake would skew every figure they print."""

import asyncio
import os
import socket
import subprocess
import sys

from bench.ab import Variant


def accepted_with_nodelay(listener: socket.socket) -> bool:
    """Whether asyncio turns Nagle's algorithm off on a connection accepted from `listener`."""

    async def accept_one() -> bool:
        loop = asyncio.get_running_loop()
        seen = loop.create_future()

        class Report(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(bool(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
                transport.close()

        server = await loop.create_server(Report, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    return asyncio.run(accept_one())


def test_the_peer_servers_answer_without_nagles_delay():
    """uvicorn releases before the fix of its issue #3149 left Nagle on with --workers N (40 ms per kept-alive
    answer), and LitServe binds its socket the same way; the peers' launchers turn it off whatever the release."""
    from uvicorn import Config

    from bench.nodelay import declare_tcp, tcp_listener

    config = Config("bench.minimal_app:app", host="127.0.0.1", port=0)
    assert accepted_with_nodelay(tcp_listener(config))
    original = Config.bind_socket
    try:
        declare_tcp()  # what bench/litserve_app.py does before LitServer.run binds its socket
        assert accepted_with_nodelay(Config("bench.litserve_app", host="127.0.0.1", port=0).bind_socket())
    finally:
        Config.bind_socket = original


def test_an_ab_variant_reads_settings_trees_and_hidden_modules(tmp_path):
    variant = Variant.parse(["before", "CIFAR10_WORKERS=2", 'X={"a": 1}', f"@{tmp_path}", "no:uvloop"])
    assert variant.env == {"CIFAR10_WORKERS": "2", "X": '{"a": 1}'} and variant.tree == tmp_path and variant.hidden == ["uvloop"]
    env = dict(os.environ, **variant.environment(tmp_path / "stubs"))
    hidden = subprocess.run([sys.executable, "-c", "import uvloop"], env=env, capture_output=True, text=True)
    assert hidden.returncode != 0 and "hidden by bench.ab" in hidden.stderr
    assert subprocess.run([sys.executable, "-c", "import uvloop"], capture_output=True).returncode == 0
