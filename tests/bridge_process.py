"""Start the bridge for end-to-end tests (in-process under trio, or as a subprocess) and talk
LMTP to it with small line clients that read every reply exactly as it came off the wire.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge import app
from bridge.config import Settings, load_settings

HOSTNAME = "bridge.test"
# the conftest fixture start_bridge: ``await start_bridge(**settings)`` -> a running bridge
StartBridge = Callable[..., Awaitable[app.Running]]
# Test defaults: fast failures, no in-session retries unless a test asks for them.
TEST_DEFAULTS: dict[str, object] = {
    "listen": ["127.0.0.1:0"],
    "metrics_listen": "127.0.0.1:0",
    "hostname": HOSTNAME,
    "http_retries": 0,
    "http_timeout": 5,
    "shutdown_grace": 2,
}


def settings_for(**overrides: object) -> Settings:
    """Test settings: TEST_DEFAULTS under ``overrides``; the process environment is ignored."""
    return load_settings(overrides={**TEST_DEFAULTS, **overrides}, environ={})


def tool(name: str) -> str:
    """The path of an external client; a missing one fails the test (CI installs them)."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} is not installed; the peer tests need it")


def short_tempdir() -> str:
    """A short directory for unix sockets (sun_path holds about 107 bytes)."""
    return tempfile.mkdtemp(prefix="lb-", dir="/tmp")


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range when there is room: a
    port the kernel hands out for bind(0) is one it also gives outgoing connections as their
    source port, so one of the suite's own connections could take it before the server under
    test binds it (a rare "Address already in use")."""
    low = _ephemeral_low()
    if low > 10_000:
        for _ in range(100):
            port = random.randrange(low // 2, low)
            if port in _HANDED_OUT:  # its first taker may not have bound it yet
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                _HANDED_OUT.add(port)
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ---- replies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]  # the text after "NNN-" / "NNN "

    @property
    def status(self) -> str:
        """The enhanced status code (first word of the last line), or ""."""
        words = self.lines[-1].split(" ", 1)
        return words[0] if words and words[0].count(".") == 2 else ""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class _ReplyParser:
    """Splits received bytes into replies (multi-line ones joined)."""

    def __init__(self) -> None:
        self.buffer = b""
        self._pending: list[str] = []

    def next_reply(self) -> ServerReply | None:
        while b"\r\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\r\n", 1)
            line = raw.decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise AssertionError(f"not a reply line: {line!r}")
            self._pending.append(line[4:])
            if line[3:4] != "-":
                reply = ServerReply(int(line[:3]), tuple(self._pending))
                self._pending = []
                return reply
        return None


class AsyncLmtp:
    """An LMTP client on a trio stream, for tests that run next to an in-process bridge."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._parser = _ReplyParser()

    @classmethod
    async def connect(cls, address: str) -> AsyncLmtp:
        stream: trio.abc.Stream
        if address.startswith("unix:"):
            stream = await trio.open_unix_socket(address[len("unix:") :])
        else:
            stream = await trio.open_tcp_stream(*split_hostport(address))
        return cls(stream)

    async def send(self, data: bytes | str) -> None:
        await self.stream.send_all(data.encode() if isinstance(data, str) else data)

    async def reply(self) -> ServerReply:
        """The next reply; AssertionError if the server closes first."""
        while True:
            reply = self._parser.next_reply()
            if reply is not None:
                return reply
            data = await self.stream.receive_some(65536)
            if not data:
                raise AssertionError(f"connection closed; unparsed {self._parser.buffer!r}")
            self._parser.buffer += data

    async def command(self, line: str) -> ServerReply:
        await self.send(line + "\r\n")
        return await self.reply()

    async def greet(self, lhlo: str = "client.test") -> None:
        greeting = await self.reply()
        assert greeting.code == 220, greeting
        assert (await self.command(f"LHLO {lhlo}")).code == 250

    async def rest_until_eof(self) -> list[ServerReply]:
        """Every reply still to come, until the server closes the connection."""
        replies = []
        while True:
            reply = self._parser.next_reply()
            if reply is not None:
                replies.append(reply)
                continue
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # a reset after the last reply also ends it
                data = b""
            if not data:
                assert self._parser.buffer == b"", self._parser.buffer
                return replies
            self._parser.buffer += data

    async def aclose(self) -> None:
        await self.stream.aclose()


class SyncLmtp:
    """The same client on a blocking socket, for tests around a subprocess bridge."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._parser = _ReplyParser()

    @classmethod
    def connect(cls, address: str, timeout: float = 15.0) -> SyncLmtp:
        return cls(socket.create_connection(split_hostport(address), timeout=timeout))

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> ServerReply:
        while True:
            reply = self._parser.next_reply()
            if reply is not None:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed; unparsed {self._parser.buffer!r}")
            self._parser.buffer += data

    def command(self, line: str) -> ServerReply:
        self.send(line + "\r\n")
        return self.reply()

    def greet(self, lhlo: str = "client.test") -> None:
        greeting = self.reply()
        assert greeting.code == 220, greeting
        assert self.command(f"LHLO {lhlo}").code == 250

    def at_eof(self) -> bool:
        """True when the server has closed (EOF or reset) and sent nothing more."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        self._parser.buffer += data
        return not data

    def close(self) -> None:
        self.sock.close()


def message(
    subject: str = "Test", body: str = "Hello.", to: str = "Bob <bob@example.org>", **headers: str
) -> bytes:
    """A small RFC 5322 message with CRLF line ends (``X_Foo=`` adds header ``X-Foo``)."""
    lines = [
        "From: Alice <alice@example.org>",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Sat, 28 Nov 2026 10:00:00 +0000",
        "Message-ID: <e2e-test@example.org>",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
        "",
        body,
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def data_section(msg: bytes) -> bytes:
    """``msg`` dot-stuffed and terminated, ready to follow a 354."""
    stuffed = b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in msg.removesuffix(b"\r\n").split(b"\r\n")
    )
    return stuffed + b".\r\n"


# ---- the bridge in this process -----------------------------------------------------------


async def start_in_process(
    nursery: trio.Nursery, settings: Settings, stopped: trio.Event | None = None
) -> app.Running:
    """Run the bridge in ``nursery``; returns once it listens. ``Running.stop()`` drains it,
    and ``stopped`` is set when ``app.run`` has returned."""

    async def run(*, task_status: trio.TaskStatus[app.Running]) -> None:
        try:
            await app.run(settings, handle_signals=False, task_status=task_status)
        finally:
            if stopped is not None:
                stopped.set()

    running: app.Running = await nursery.start(run)
    return running


async def open_session(running: app.Running) -> AsyncLmtp:
    """An LMTP session with the in-process bridge, greeted."""
    client = await AsyncLmtp.connect(running.lmtp_addresses[0])
    await client.greet()
    return client


async def metrics_text(running: app.Running) -> str:
    status, text = await trio.to_thread.run_sync(
        http_get, f"http://127.0.0.1:{running.metrics_port}/metrics"
    )
    assert status == 200
    return text


def codes(replies: list[ServerReply]) -> list[str]:
    """Replies as "250 2.0.0" strings, easy to compare."""
    return [f"{r.code} {r.status}" for r in replies]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """A blocking GET (call through trio.to_thread from trio code): (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(metrics_text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample of the Prometheus text; 0.0 when the series is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = dict(labels or {})
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it is true, without blocking the event loop; the caller bounds it
    with ``trio.fail_after``."""
    while True:
        if await check():
            return
        await trio.sleep(0.02)


# ---- the bridge as a subprocess -----------------------------------------------------------


def lmtp_bridge_command() -> list[str]:
    """The installed console script when there is one, else ``python -m bridge``."""
    script = Path(sys.executable).parent / "lmtp-bridge"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "bridge"]


class BridgeProcess:
    """``python -m bridge serve`` on free ports; settings beyond the flags go in as env vars."""

    def __init__(
        self, webhook_url: str, env: Mapping[str, str] | None = None, *, listen: str | None = None
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = listen or f"127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LMTP_BRIDGE_")}
        environ.update(
            LMTP_BRIDGE_HOSTNAME=HOSTNAME,
            LMTP_BRIDGE_HTTP_RETRIES="0",
            LMTP_BRIDGE_HTTP_TIMEOUT="5",
            LMTP_BRIDGE_SHUTDOWN_GRACE="2",
        )
        environ.update(env or {})
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "serve",
                "--listen",
                self.address,
                "--webhook-url",
                webhook_url,
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--log-format",
                "json",
            ],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def wait_ready(self, timeout: float = 15.0) -> BridgeProcess:
        """Wait until the LMTP port accepts and /readyz answers 200."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"bridge exited with {self.process.returncode}:\n{self.log}")
            try:
                socket.create_connection(split_hostport(self.address), timeout=1).close()
                return http_get(f"{self.metrics_url}/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, "the bridge to become ready")
        return self

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"bridge still running after {timeout} s:\n{self.log}") from None

    @property
    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()

    def __enter__(self) -> BridgeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
