"""The sidecar's HTTP fallback client against real loopback servers."""

from __future__ import annotations

import asyncio

import pytest

from dpumesh.fallback import FallbackClient, FallbackError, Peer


class Server:
    """A loopback HTTP/1.1 server answering each request after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received = b""
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while head := await reader.readuntil(b"\r\n\r\n"):
            self.received += head
            await asyncio.sleep(self.delay)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-peer: yes\r\n\r\nok")
            await writer.drain()
            if reader.at_eof():
                break

    async def start(self) -> Peer:
        async def guarded(reader, writer):
            try:
                await self.handle(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(guarded, "127.0.0.1", 0)
        return Peer("127.0.0.1", self.server.sockets[0].getsockname()[1])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_requests_reuse_one_connection():
    async def scenario():
        server = Server()
        peer = await server.start()
        client = FallbackClient()
        for _ in range(5):
            status, headers, body = await client.request(peer, "GET", "/a", [], b"", 5)
            assert (status, body, ("x-peer", "yes") in headers) == (200, b"ok", True)
        client.close()
        server.server.close()
        return server.connections

    assert run(scenario()) == 1


def test_a_slow_peer_does_not_hold_up_another():
    async def scenario():
        slow, fast = Server(delay=1.0), Server()
        slow_peer, fast_peer = await slow.start(), await fast.start()
        client = FallbackClient()
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow_call = asyncio.ensure_future(client.request(slow_peer, "GET", "/", [], b"", 5))
        await client.request(fast_peer, "GET", "/", [], b"", 5)
        fast_done = loop.time() - started
        await slow_call
        client.close()
        return fast_done

    assert run(scenario()) < 0.5


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/x HTTP/1.1\r\nX-Injected: 1", []),
        ("GET", "/x", [("x", "a\r\nX-Injected: 1")]),
        ("GET", "/x", [("bad name", "v")]),
        ("GET", "/x", [("x", "\u20ac")]),
        ("G T", "/x", []),
    ],
)
def test_nothing_that_changes_the_framing_is_sent(method, path, headers):
    async def scenario():
        server = Server()
        peer = await server.start()
        client = FallbackClient()
        with pytest.raises(FallbackError, match="refusing"):
            await client.request(peer, method, path, headers, b"", 5)
        await asyncio.sleep(0.05)
        client.close()
        server.server.close()
        return server.received

    assert run(scenario()) == b""
