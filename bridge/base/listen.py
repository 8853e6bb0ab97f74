"""Listen addresses: ``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path``, parsed once and named the
same way in every message."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed listen address: ``tcp`` with host and port, or ``unix`` with a path."""

    kind: Literal["tcp", "unix"]
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(addr: str) -> ListenAddress:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path``; raises ValueError saying why not."""
    text = addr.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or "\x00" in path:
            raise ValueError(f"{addr!r}: expected unix:/path/to/socket")
        return ListenAddress("unix", path=path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{addr!r}: expected [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{addr!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{addr!r}: expected HOST:PORT, [IPv6]:PORT or unix:/path")
        if ":" in host:
            raise ValueError(f"{addr!r}: put an IPv6 address in brackets, as [::1]:2424")
        if not HOSTNAME.fullmatch(host):
            raise ValueError(f"{addr!r}: {host!r} is not a host name or IP address")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{addr!r}: the port must be a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{addr!r}: port {port} is out of range 0-65535")
    return ListenAddress("tcp", host=host, port=port)


class ListenError(OSError):
    """A listening socket that could not be opened, as one line naming what and where:
    ``cannot listen on 127.0.0.1:2424 for LMTP (listen): Address already in use``."""

    def __init__(self, what: str, address: object, cause: OSError) -> None:
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(f"cannot listen on {address} for {what}: {reason}")


@contextmanager
def naming_listen_errors(what: str, address: object) -> Iterator[None]:
    """Turn an OSError of the block (bind, listen, name lookup) into a ListenError."""
    try:
        yield
    except ListenError:
        raise
    except OSError as exc:
        raise ListenError(what, address, exc) from exc
