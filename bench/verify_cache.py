#!/usr/bin/env python3
"""What a recipient-verification cache hit costs per RCPT (goal: < 20 µs). Prints figures.

1. ``Verifier.lookup()`` alone on a warm cache of ``--cache`` recipients (the work a hit adds,
   metrics included), against a cold miss of the same dict (what a route without a verify_url
   pays: nothing at all).
2. The whole RCPT path through a running in-process server: one LMTP session pipelines
   ``MAIL``, ``--rcpts`` RCPTs and ``RSET``, in pairs of batches back to back: one to a route
   with a verify_url (every recipient cached), one to a route without. The median of the pairs'
   differences, per RCPT, is what a hit adds end to end; wall time and CPU time (the bridge
   and the client share this process, so the client's reading cancels out).

usage: .venv/bin/python bench/verify_cache.py [--cache 10000] [--rcpts 500] [--pairs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import timeit

import trio

from bridge.base.route import Route
from bridge.delivery.deliverer import Deliverer
from bridge.delivery.routing import Router
from bridge.delivery.verify import VERIFIED, Verifier, cache_key
from bridge.lmtp.connection import Limits
from bridge.server.sessions import LmtpServer, ServerOptions
from bridge.webhook.client import WebhookClient

VERIFY_URL = "http://127.0.0.1:9/verify"  # never asked: every recipient is in the cache


def routes() -> tuple[Route, Route]:
    verified = Route(name="verified", url="http://127.0.0.1:9/hook", verify_url=VERIFY_URL)
    plain = Route(name="plain", url="http://127.0.0.1:9/hook")
    return verified, plain


def warm(verifier: Verifier, route: Route, addresses: list[str]) -> None:
    for address in addresses:
        verifier.cache.put(cache_key(route, address), VERIFIED, 1e9)


def micro(cache_size: int) -> None:
    verified, _ = routes()
    verifier = Verifier(WebhookClient(), cache_size=cache_size)
    addresses = [f"user{i}@verified.test" for i in range(cache_size)]
    warm(verifier, verified, addresses)
    assert verifier.lookup(verified, addresses[0]) == VERIFIED
    n = 200_000
    picks = [addresses[(i * 7919) % cache_size] for i in range(n)]

    def hits() -> None:
        lookup = verifier.lookup
        for address in picks:
            lookup(verified, address)

    best = min(timeit.repeat(hits, number=1, repeat=5)) / n
    print(f"lookup() cache hit, {cache_size} entries: {best * 1e6:.2f} µs per RCPT (best of 5)")


class Session:
    """One pipelining LMTP client session in the benchmark's own trio loop."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def replies(self, count: int) -> None:
        seen = 0
        while True:
            while (end := self.buf.find(b"\r\n")) >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                if line[3:4] == b" ":
                    if line[:1] not in (b"2", b"3"):
                        raise AssertionError(line)
                    seen += 1
                    if seen == count:
                        return
            self.buf += await self.stream.receive_some(1 << 16)

    async def batch(self, data: bytes, rcpts: int) -> tuple[float, float]:
        """(wall, CPU) seconds for one pipelined MAIL + RCPTs + RSET."""
        wall, cpu = time.perf_counter(), time.process_time()
        await self.stream.send_all(data)
        await self.replies(rcpts + 2)
        return time.perf_counter() - wall, time.process_time() - cpu


def batch_for(domain: str, rcpts: int) -> bytes:
    return (
        b"MAIL FROM:<a@example.org>\r\n"
        + b"".join(b"RCPT TO:<user%d@%s>\r\n" % (i, domain.encode()) for i in range(rcpts))
        + b"RSET\r\n"
    )


async def end_to_end(rcpts: int, pairs: int) -> None:
    verified, plain = routes()
    router = Router([("@verified.test", verified), ("@plain.test", plain)], None)
    async with WebhookClient() as client:
        verifier = Verifier(client, cache_size=max(10_000, rcpts))
        warm(verifier, verified, [f"user{i}@verified.test" for i in range(rcpts)])
        options = ServerOptions(hostname="bench.test", limits=Limits(max_recipients=rcpts))
        server = LmtpServer(options, router, Deliverer(client, "bench.test"), verifier)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            session = Session(await trio.open_tcp_stream("127.0.0.1", port))
            await session.replies(1)
            await session.stream.send_all(b"LHLO bench.test\r\n")
            await session.replies(1)
            on_batch, off_batch = batch_for("verified.test", rcpts), batch_for("plain.test", rcpts)
            for _ in range(3):  # warm-up
                await session.batch(off_batch, rcpts)
                await session.batch(on_batch, rcpts)
            # pairs of batches back to back, so both see the same machine at the same moment
            on: list[tuple[float, float]] = []
            off: list[tuple[float, float]] = []
            for i in range(pairs):
                first, second = (on_batch, off_batch) if i % 2 else (off_batch, on_batch)
                a = await session.batch(first, rcpts)
                b = await session.batch(second, rcpts)
                (on if i % 2 else off).append(a)
                (off if i % 2 else on).append(b)
            await session.stream.aclose()
            server.drain()
            nursery.cancel_scope.cancel()

    def per_rcpt(values: list[float]) -> str:
        return f"{statistics.median(values) / rcpts * 1e6:6.2f}"

    print(f"RCPT through a session: {pairs} pairs of batches of {rcpts} pipelined RCPTs")
    for what, index in (("wall", 0), ("CPU (bridge and client)", 1)):
        off_v, on_v = [x[index] for x in off], [x[index] for x in on]
        added = [a - b for a, b in zip(on_v, off_v, strict=True)]
        print(
            f"  {what}: without verify_url {per_rcpt(off_v)} µs per RCPT, verify with a cache "
            f"hit {per_rcpt(on_v)} µs; added by the hit: {per_rcpt(added)} µs per RCPT "
            "(median of the pairs' differences)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=int, default=10_000)
    ap.add_argument("--rcpts", type=int, default=500)
    ap.add_argument("--pairs", type=int, default=200)
    args = ap.parse_args()
    micro(args.cache)
    trio.run(end_to_end, args.rcpts, args.pairs)
    print(f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
