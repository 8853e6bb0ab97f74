"""One mail transaction as the bridge sees it: envelope, recipients and the spooled message."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, TYPE_CHECKING

from bridge.base import memory

if TYPE_CHECKING:
    from bridge.base.route import Route

READ_CHUNK = 256 * 1024
# A message at least this big tells bridge.base.memory when its bytes (and whatever its parse
# allocated) are freed: glibc keeps freed heap memory unless told to give it back.
RELEASE_AT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the client said about the message, shared by every recipient's copy."""

    mail_from: str  # "" for the null sender
    lhlo: str
    client_address: str  # IP address, or "unix" for a unix-socket peer
    body: str | None  # BODY= parameter, None when not given
    smtputf8: bool
    size: int | None  # SIZE= parameter as declared by the client
    xforward: dict[str, str] = field(default_factory=dict)  # keys lower case: name, addr, ...
    received_at: datetime | None = None
    tls: bool = False  # the session ran STARTTLS before this transaction


@dataclass(frozen=True, slots=True)
class Recipient:
    """An accepted RCPT: the address, its ORCPT= and the route that will carry it."""

    address: str
    route: Route
    orcpt: str | None = None


class MemoryBudget:
    """Bytes of messages every session together holds in memory (``spool_memory_limit``):
    1,000 sessions each sending 1 MiB would otherwise hold 1 GiB; past the budget a message
    goes on in its spool file."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class MessageBuffer:
    """The message bytes as received: in memory up to a threshold (and while the shared
    ``budget`` lasts), then in a temporary file.

    The SHA-256 of the bytes is kept as they arrive, so delivery ids cost no second pass.
    """

    def __init__(
        self, spool_threshold: int, spool_dir: str | None = None, budget: MemoryBudget | None = None
    ) -> None:
        self._threshold = spool_threshold
        self._spool_dir = spool_dir
        self._budget = budget
        self._counted = 0  # bytes of this message counted in the budget
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self.size = 0
        # (start, end) of the last piece written with an 8-bit byte or an ESC: see plain_from
        self._marked = (0, 0)

    @property
    def spooled(self) -> bool:
        return self._file is not None

    @property
    def spool_dir(self) -> str | None:
        """Where spool files go (None: the system's temporary directory)."""
        return self._spool_dir

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        # A tenth of the hash's cost (64 KiB: 17 us against 150 us); it spares the parse a
        # read of a plain text body (BodyText.decide).
        if not data.isascii() or b"\x1b" in data:
            self._marked = (self.size - len(data), self.size)
        if self._file is None:
            self._chunks.append(data)
            budget = self._budget
            if self.size > self._threshold or (
                budget is not None and budget.used + len(data) > budget.limit
            ):
                # closed by close(), which the session calls when the transaction ends
                self._file = tempfile.TemporaryFile(prefix="lmtp-bridge-", dir=self._spool_dir)  # noqa: SIM115
                self._file.writelines(self._chunks)
                self._chunks = []
                self._uncount()
                memory.released(self.size)
            elif budget is not None:
                budget.used += len(data)
                self._counted += len(data)
        else:
            self._file.write(data)

    def digest(self) -> bytes:
        return self._hash.digest()

    def getvalue(self) -> bytes:
        if self._file is None:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return self._chunks[0] if self._chunks else b""
        self._file.seek(0)
        return self._file.read()

    def iter_chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message in pieces, without loading a spooled file into memory."""
        if self._file is None:
            yield from self._chunks
            return
        self._file.flush()
        offset = 0
        fd = self._file.fileno()

        while True:
            piece = os.pread(fd, chunk_size, offset)
            if not piece:
                return
            offset += len(piece)
            yield piece

    def chunks_from(self, start: int, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The bytes ``start:`` of the message, never more than ``chunk_size`` at a time."""
        if self._file is None:
            # In memory already: one join of the pieces as received, then even slices.
            view = memoryview(self.getvalue())
            for i in range(start, len(view), chunk_size):
                yield bytes(view[i : i + chunk_size])
            return
        pos = 0
        for chunk in self.iter_chunks(chunk_size):
            skip = start - pos
            pos += len(chunk)
            if skip >= len(chunk):
                continue
            yield chunk[skip:] if skip > 0 else chunk

    def plain_from(self, start: int) -> bool:
        """Whether the bytes ``start:`` are 7-bit with no ESC: plain ASCII text, which UTF-8
        and the usual guesses read alike. Known from what ``write`` noted, without a pass over
        the bytes (at most the part of one piece that begins before ``start`` is read)."""
        first, end = self._marked
        if end <= start:
            return True
        if first >= start:
            return False
        if self._file is None:
            tail = self.getvalue()[start:end]
        else:
            self._file.flush()
            tail = os.pread(self._file.fileno(), end - start, start)
        return tail.isascii() and b"\x1b" not in tail

    def _uncount(self) -> None:
        if self._budget is not None:
            self._budget.used -= self._counted
        self._counted = 0

    def close(self) -> None:
        self._uncount()
        if self.size >= RELEASE_AT and (self._chunks or self._file is not None):
            memory.released(self.size)  # its bytes, or what its parse held
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
