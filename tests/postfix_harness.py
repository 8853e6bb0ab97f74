"""A private Postfix instance as a real MTA in front of the bridge, and a chaos webhook.

``PrivatePostfix`` runs Debian's Postfix from a temporary directory of its own: its own
``config_directory``, ``queue_directory`` and ``data_directory``, no smtpd listener unless asked
for (then on a loopback port, never 25), every recipient sent to ``default_transport =
lmtp:...`` (the bridge), short backoff times, and ``maillog_file`` in the temporary directory.
Mail goes in through Postfix's own ``sendmail -C DIR``. The oracle is what Postfix says: the
``status=sent/deferred/bounced`` lines of its log, and its queue (``postqueue -j``).

``ChaosWebhook`` is a small HTTP receiver that answers 2xx, or 503 / a TCP reset with a given
probability, and records which delivery id got which answer.

Used by tests/test_postfix*.py and bench/soak.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bridge_process import BridgeProcess, http_get, wait_for

SBIN = "/usr/sbin"
POSTFIX_TOOLS = ("postfix", "sendmail", "postqueue", "postsuper")

# Postfix's daemons, none chrooted, no smtpd: nothing listens on a network port.
# ``flags=X`` on lmtp: the bridge is the final hop, Postfix says "delivered", not "relayed".
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp flags=X
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Short retry times: a deferred recipient is tried again after 1-2 s, not 5 minutes.
DEFAULT_MAIN_CF: dict[str, str] = {
    "compatibility_level": "3.6",
    "command_directory": SBIN,
    "daemon_directory": "/usr/lib/postfix/sbin",
    "meta_directory": "/etc/postfix",
    "shlib_directory": "/usr/lib/postfix",
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "myhostname": "pfx.test",
    "mydomain": "test",
    "myorigin": "pfx.test",
    "mydestination": "",
    "local_recipient_maps": "",
    "inet_interfaces": "loopback-only",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "alias_maps": "",
    "alias_database": "",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "queue_run_delay": "1s",
    "message_size_limit": str(40 << 20),
    "lmtp_send_xforward_command": "yes",
    "lmtp_destination_recipient_limit": "50",
    "bounce_queue_lifetime": "1d",
    "maximal_queue_lifetime": "1d",
}

_STATUS = re.compile(
    r"postfix/(?P<agent>[\w-]+)\[\d+\]: (?P<qid>[0-9A-F]+): to=<(?P<rcpt>[^>]*)>,"
    r"(?: orig_to=<[^>]*>,)? relay=(?P<relay>[^,]*),(?: conn_use=(?P<conn_use>\d+),)?"
    r" delay=(?P<delay>[\d.]+), delays=[^,]*, dsn=(?P<dsn>[\d.]+),"
    r" status=(?P<status>\w+) \((?P<text>.*)\)$"
)
_MESSAGE_ID = re.compile(r"postfix/cleanup\[\d+\]: (?P<qid>[0-9A-F]+): message-id=<(?P<mid>[^>]*)>")
_BOUNCE = re.compile(
    r"postfix/bounce\[\d+\]: (?P<qid>[0-9A-F]+): sender non-delivery notification: "
    r"(?P<dsn_qid>[0-9A-F]+)"
)


def postfix_tool(name: str) -> str:
    """The path of a Postfix command; a missing one is an error (CI installs Postfix)."""
    for candidate in (f"{SBIN}/{name}", shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"{name} is not installed (Debian package postfix); the tests need it")


@dataclass(frozen=True)
class Outcome:
    """One ``status=`` line of Postfix's log: what happened to one recipient in one try."""

    qid: str
    rcpt: str
    status: str  # sent, deferred, bounced, expired
    dsn: str
    relay: str
    conn_use: int  # 1 for a new connection, n for its n-th use
    delay: float
    text: str


class PostfixError(AssertionError):
    pass


class PrivatePostfix:
    """A Postfix instance under its own temporary directory; ``transport`` is the nexthop of
    ``default_transport``, e.g. ``lmtp:inet:127.0.0.1:2424`` or ``lmtp:unix:/path``. With
    ``smtpd_port``, its smtpd listens on 127.0.0.1 at that port (never 25).

    Use it as a context manager: it is stopped (and its directory removed) even on failure.
    """

    def __init__(
        self,
        transport: str,
        main_cf: Mapping[str, str] | None = None,
        *,
        keep: bool = False,
        smtpd_port: int | None = None,
    ) -> None:
        for name in POSTFIX_TOOLS:
            postfix_tool(name)
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (postfix start)")
        self.root = Path(tempfile.mkdtemp(prefix="pfx-", dir="/tmp"))
        self.root.chmod(0o755)  # Postfix's daemons run as user postfix
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.keep = keep
        self.started = False
        self.settings = dict(DEFAULT_MAIN_CF)
        self.settings.update(
            queue_directory=str(self.queue_dir),
            data_directory=str(self.data_dir),
            maillog_file=str(self.maillog),
            maillog_file_prefixes=str(self.root),
            default_transport=transport,
            relay_transport=transport,
        )
        self.settings.update(main_cf or {})
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir()
        shutil.chown(self.data_dir, "postfix")
        master_cf = MASTER_CF
        if smtpd_port is not None:  # an SMTP server on a loopback port (never 25)
            if smtpd_port == 25:
                raise ValueError("the test Postfix never listens on port 25")
            master_cf += f"127.0.0.1:{smtpd_port} inet n - n - - smtpd\n"
        self.smtpd_port = smtpd_port
        (self.config_dir / "master.cf").write_text(master_cf)
        # messages with a header "X-Hold: yes" wait in the hold queue until release()
        (self.config_dir / "header_checks").write_text("/^X-Hold: yes$/ HOLD held for the test\n")
        self.settings.setdefault("header_checks", f"regexp:{self.config_dir}/header_checks")
        self._write_main_cf()

    def _write_main_cf(self) -> None:
        text = "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        (self.config_dir / "main.cf").write_text(text)

    # --- lifecycle ---

    def _run(self, *argv: str, input: bytes | None = None, timeout: float = 60) -> str:
        result = subprocess.run(
            [postfix_tool(argv[0]), *argv[1:]],
            input=input,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "MAIL_CONFIG": str(self.config_dir)},
        )
        if result.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace')}{self._log_tail()}"
            )
        return result.stdout.decode("utf-8", "replace")

    def start(self) -> PrivatePostfix:
        self._run("postfix", "-c", str(self.config_dir), "start")
        self.started = True
        self._start_watchdog()
        wait_until(
            lambda: "daemon started" in self.log(), 30, "Postfix's master to start", self._log_tail
        )
        return self

    def reconfigure(self, **settings: str) -> None:
        """Change main.cf settings and ``postfix reload`` (running) or just rewrite them."""
        self.settings.update(settings)
        self._write_main_cf()
        if self.started:
            self._run("postfix", "-c", str(self.config_dir), "reload")

    def _start_watchdog(self) -> None:
        """Postfix's master is a daemon: if this process dies without stop() (killed by a
        timeout, say), a watchdog in its own session stops Postfix and removes the directory."""
        marker = self.root / "running"
        marker.touch()
        script = (
            'while kill -0 "$1" 2>/dev/null && [ -e "$2/running" ]; do sleep 1; done; '
            '[ -e "$2/running" ] || exit 0; '
            f'{postfix_tool("postfix")} -c "$2/etc" stop >/dev/null 2>&1; sleep 5; '
            '[ "$3" = keep ] || rm -rf "$2"'
        )
        subprocess.Popen(
            ["sh", "-c", script, "postfix-watchdog", str(os.getpid()), str(self.root),
             "keep" if self.keep else "remove"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        (self.root / "running").unlink(missing_ok=True)  # the watchdog leaves quietly
        if self.started:
            self.started = False
            with contextlib.suppress(PostfixError, subprocess.TimeoutExpired):
                self._run("postfix", "-c", str(self.config_dir), "stop")
            self._wait_master_gone()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _wait_master_gone(self) -> None:
        """``postfix stop`` returns before master has exited; kill it if it lingers."""
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)

    def __enter__(self) -> PrivatePostfix:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- mail in ---

    def sendmail(self, message: bytes, sender: str, recipients: Iterable[str]) -> None:
        """Inject ``message`` (LF or CRLF line ends) with Postfix's ``sendmail -C DIR``."""
        rcpts = list(recipients)
        self._run(
            "sendmail",
            "-C",
            str(self.config_dir),
            "-i",
            "-f",
            sender,
            "--",
            *rcpts,
            input=message,
        )

    def release(self) -> None:
        """``postsuper -H ALL``: let held messages (header ``X-Hold: yes``) go, all at once."""
        self._run("postsuper", "-c", str(self.config_dir), "-H", "ALL")

    def flush(self) -> None:
        """``postqueue -f``: try every deferred message now."""
        self._run("postqueue", "-c", str(self.config_dir), "-f")

    # --- the oracle ---

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one JSON object per queued message."""
        out = self._run("postqueue", "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log(self) -> str:
        try:
            return self.maillog.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        return "\n--- maillog (tail) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    def outcomes(self) -> list[Outcome]:
        """Every ``status=`` line so far, in log order."""
        found = []
        for line in self.log().splitlines():
            match = _STATUS.search(line)
            if match:
                found.append(
                    Outcome(
                        qid=match["qid"],
                        rcpt=match["rcpt"],
                        status=match["status"],
                        dsn=match["dsn"],
                        relay=match["relay"],
                        conn_use=int(match["conn_use"] or 1),
                        delay=float(match["delay"]),
                        text=match["text"],
                    )
                )
        return found

    def queue_ids(self) -> dict[str, str]:
        """Message-ID (without <>) -> queue id, from cleanup's log lines."""
        return {m["mid"]: m["qid"] for m in _MESSAGE_ID.finditer(self.log())}

    def bounce_notices(self) -> dict[str, str]:
        """queue id of a bounced message -> queue id of the non-delivery notice Postfix made."""
        return {m["qid"]: m["dsn_qid"] for m in _BOUNCE.finditer(self.log())}

    def wait_queue_empty(self, timeout: float, *, flush_every: float = 5.0) -> None:
        """Until Postfix's queue is empty (flushing now and then), or PostfixError."""
        deadline = time.monotonic() + timeout
        next_flush = time.monotonic() + flush_every
        while True:
            queued = self.queue()
            if not queued:
                return
            now = time.monotonic()
            if now > deadline:
                raise PostfixError(
                    f"{len(queued)} message(s) still queued after {timeout} s, e.g. "
                    f"{json.dumps(queued[:3])}{self._log_tail()}"
                )
            if now > next_flush:
                self.flush()
                next_flush = now + flush_every
            time.sleep(0.25)

    def wait_outcomes(
        self, check: Callable[[list[Outcome]], bool], timeout: float, what: str
    ) -> list[Outcome]:
        """Until ``check(outcomes())`` holds; returns the outcomes."""
        found: list[Outcome] = []

        def done() -> bool:
            nonlocal found
            found = self.outcomes()
            return check(found)

        wait_until(done, timeout, what, self._log_tail)
        return found


def wait_until(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    details: Callable[[], str] = lambda: "",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise PostfixError(f"timed out after {timeout} s waiting for {what}{details()}")
        time.sleep(0.1)


def final_status(outcomes: Iterable[Outcome]) -> dict[str, list[str]]:
    """recipient -> its statuses in log order, e.g. ``["deferred", "sent"]``."""
    by_rcpt: dict[str, list[str]] = {}
    for outcome in outcomes:
        by_rcpt.setdefault(outcome.rcpt, []).append(outcome.status)
    return by_rcpt


def make_message(
    message_id: str,
    *,
    subject: str = "Test",
    body: str | bytes = "Hello.\n",
    to: str = "undisclosed-recipients:;",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A message with LF line ends, as a local program hands it to sendmail."""
    head = [
        "From: Alice <alice@example.org>",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Sat, 28 Nov 2026 10:00:00 +0000",
        f"Message-ID: <{message_id}>",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    raw_body = body.encode() if isinstance(body, str) else body
    return ("\n".join(head) + "\n\n").encode() + raw_body


class Bridge(BridgeProcess):
    """BridgeProcess that also waits for a unix listener to be ready."""

    def wait_ready(self, timeout: float = 15.0) -> BridgeProcess:
        if not self.address.startswith("unix:"):
            return super().wait_ready(timeout)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"bridge exited with {self.process.returncode}:\n{self.log}")
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(self.address.removeprefix("unix:"))
                return http_get(f"{self.metrics_url}/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, "the bridge to become ready")
        return self


def transport_for(address: str) -> str:
    """Postfix's nexthop for a bridge listen address."""
    return f"lmtp:{address}" if address.startswith("unix:") else f"lmtp:inet:{address}"


# ---- a webhook that fails at random -------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One request the chaos webhook received, and what it answered (0 = reset)."""

    delivery_id: str
    rcpt: str
    mail_from: str
    message_id: str
    status: int
    at: float  # time.time()


class _ChaosHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ChaosServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_POST(self) -> None:
        owner = self.server.owner
        try:
            payload = json.loads(self._read_body())
            rcpt = payload["envelope"]["rcpt_to"]
            mail_from = payload["envelope"]["mail_from"]
            message_id = (payload["message"].get("message_id") or "").strip("<>")
        except (ValueError, KeyError, TypeError, OSError):
            # cut short (a killed bridge): nobody waits for an answer; count it, drop it
            owner.incomplete += 1
            self.close_connection = True
            return
        status = owner.choose()
        owner.record(
            Hit(
                self.headers.get("webhook-id", ""),
                rcpt,
                mail_from,
                message_id,
                status,
                time.time(),
            )
        )
        if status == 0:  # a TCP reset instead of an answer
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
            return
        answer = b"ok" if status < 300 else b"busy, try later"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class _ChaosServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    owner: ChaosWebhook

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (a killed bridge) are expected here


class ChaosWebhook:
    """Answers 200, or with probability ``failure_rate`` a 503 or a reset (half each)."""

    def __init__(self, failure_rate: float = 0.0, seed: int | None = None) -> None:
        self.failure_rate = failure_rate
        self.seed = seed if seed is not None else random.randrange(1 << 32)
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        self.hits: list[Hit] = []
        self.incomplete = 0  # requests whose body was cut short
        self._httpd = _ChaosServer(("127.0.0.1", 0), _ChaosHandler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/hook"

    def choose(self) -> int:
        with self._lock:
            if self._random.random() >= self.failure_rate:
                return 200
            return 503 if self._random.random() < 0.5 else 0

    def record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def __enter__(self) -> ChaosWebhook:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
