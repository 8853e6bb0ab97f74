"""Plain-TCP reads and writes straight on the socket, for the hot paths of both protocols.

trio's stream and socket wrappers cost more than the system call for the small, lockstep
messages of LMTP and webhook requests; TLS streams always take trio's own path.
"""

from __future__ import annotations

import os

import trio


def send_now(stream: trio.abc.Stream, data: bytes) -> int:
    """How much of ``data`` a plain TCP socket takes at once, without waiting; 0 for a TLS
    stream, a full socket buffer or any error (the caller then sends the rest the trio way,
    which reports the error)."""
    if type(stream) is not trio.SocketStream:
        return 0
    try:
        return os.write(stream.socket.fileno(), data)  # trio's sockets are non-blocking
    except OSError:
        return 0


async def receive_some(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """``stream.receive_some(max_bytes)``, always a checkpoint; a connection error is
    ``trio.BrokenResourceError``, as from the stream."""
    if type(stream) is not trio.SocketStream:
        return bytes(await stream.receive_some(max_bytes))
    sock = stream.socket
    waited = False
    while True:
        try:
            data = os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            waited = True
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        if not waited:
            await trio.lowlevel.checkpoint()
        return data
