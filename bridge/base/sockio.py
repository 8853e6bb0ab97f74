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


SEND_PIECE = 64 * 1024  # octets handed to a TLS stream at a time by send_some()


async def send_some(stream: trio.abc.Stream, data: bytes | memoryview) -> int:
    """Send a non-empty part of ``data`` (waiting until the peer can take some): how much.

    A caller that bounds each call sees the peer's progress, not the time the whole takes;
    on a plain socket a cancelled call has sent nothing. A connection error is
    ``trio.BrokenResourceError``.
    """
    if type(stream) is not trio.SocketStream:
        piece = data[:SEND_PIECE]
        await stream.send_all(piece)
        return len(piece)
    sock = stream.socket
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            sent = os.write(sock.fileno(), data)  # trio's sockets are non-blocking
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            waited = True
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()  # sent: a cancel must not hide it
        return sent


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
