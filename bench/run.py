#!/usr/bin/env python3
"""Benchmark lmtp-bridge against the aiosmtpd peer, in the same run, on this machine.

One command starts everything (on 127.0.0.1, free ports found at run time): the nginx webhook
sink, then for each server under test (the bridge in json and raw mode, optionally with
--workers, and the aiosmtpd peer) a fresh process, the smtp-source -L workloads (a)-(e) against
it, and prints per workload: deliveries/s, messages/s, p50/p99 latency from the end of data to
the last reply (a probe session, see below), server CPU seconds, idle and peak RSS, and the
ratio of the bridge to the peer measured in the same round. Several short rounds; medians.

usage: bench/run.py [--rounds 3] [--workloads abcde] [--servers json,raw,peer] [--workers 2]
needs: bench/setup.sh (nginx + echo module, postfix's smtp-source, wrk, a venv with aiosmtpd)

Latency: smtp-source reports no timings, so a probe client runs beside it for the whole
workload: one more session sending messages of the workload's shape one after another (10 ms
apart) and timing the final dot -> last reply. It loads every server alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BRIDGE = REPO / ".venv" / "bin" / "lmtp-bridge"
PEER_VENV = Path(os.environ.get("BENCH_VENV", "/tmp/lmtp-bench-venv"))
SMTP_SOURCE = "/usr/sbin/smtp-source"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# name: sessions, messages, recipients per message, payload bytes
WORKLOADS = {
    "a": (10, 2000, 1, 4096),
    "b": (10, 1000, 5, 4096),
    "c": (5, 200, 1, 256 * 1024),
    "d": (2, 20, 1, 10 * 1024 * 1024),
    "e": (10, 500, 20, 4096),
}
GOALS = {"a": 2.0, "b": 2.0, "c": 3.0, "d": 4.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


# --- the nginx sink ---------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lmtp-bench-sink-"))
        self.port = free_port()
        conf = (HERE / "nginx_sink.conf").read_text()
        conf = conf.replace("/tmp/webhook-sink", str(self.dir)).replace("18080", str(self.port))
        (self.dir / "nginx.conf").write_text(conf)
        self.pidfile = self.dir / "nginx.pid"

    def __enter__(self) -> Sink:
        args = ["nginx", "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf")]
        args += ["-e", str(self.dir / "error.log")]
        subprocess.run(args, check=True)
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, signal.SIGQUIT)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def requests(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(b"GET /nginx_status HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return int(data.split(b"\r\n\r\n", 1)[1].split(b"\n")[2].split()[2])


# --- servers under test -----------------------------------------------------------------------


@dataclass
class Server:
    label: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # python -m bridge imports the bridge found here first
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        name = self.label.replace("/", "_")
        log = open(f"/tmp/lmtp-bench-{name}.log", "wb")  # noqa: SIM115
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=self.cwd
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def pids(self) -> list[int]:
        """The server process and its children (workers)."""
        assert self.proc is not None
        pids = [self.proc.pid]
        try:
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                children = Path(f"/proc/{self.proc.pid}/task/{task}/children").read_text()
                pids += [int(p) for p in children.split()]
        except OSError:
            pass
        return pids

    def cpu(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError):
                pass
        return total / CLK_TCK

    def _status(self, key: str) -> int:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def reset_peak(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def rss_kib(self) -> int:
        return self._status("VmRSS:")

    def peak_kib(self) -> int:
        return self._status("VmHWM:")


def bridge_server(
    label: str,
    sink: Sink,
    payload: str,
    workers: int,
    transport: str,
    verify: bool = False,
    tree: str = "",
    per_message: bool = False,
) -> Server:
    port = free_port()
    # label@TREE: the bridge of another checkout (before/after in the same run)
    command = [str(REPO / ".venv" / "bin" / "python"), "-m", "bridge"] if tree else [str(BRIDGE)]
    argv = [
        *command,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--webhook-url",
        sink.url,
        "--payload",
        payload,
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
        "--log-level",
        "WARNING",
    ]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = {"LMTP_BRIDGE_HTTP_TRANSPORT": transport}
    if verify:  # recipient verification at RCPT, asked of the sink (200); warm after warm_up
        env["LMTP_BRIDGE_VERIFY_URL"] = f"http://127.0.0.1:{sink.port}/verify"
    if per_message:  # one request per message for all its recipients (SPEC 8)
        env["LMTP_BRIDGE_DELIVERY"] = "message"
    return Server(label, argv, port, env, tree or None)


def go_server(sink: Sink) -> Server:
    """The Go peer (go-smtp + net/http), when built: GO_PEER names the binary (default
    /tmp/go-peer/go-peer, what the team's reference harness builds; optional)."""
    port = free_port()
    argv = [GO_PEER, "-listen", f"127.0.0.1:{port}", "-url", sink.url]
    return Server("go", argv, port)


GO_PEER = os.environ.get("GO_PEER", "/tmp/go-peer/go-peer")


def peer_server(sink: Sink) -> Server:
    port = free_port()
    argv = [str(PEER_VENV / "bin" / "python"), str(HERE / "peer_aiosmtpd_bridge.py"), sink.url]
    return Server("peer", [*argv, "--port", str(port)], port)


# --- load and latency -------------------------------------------------------------------------


def message(size: int) -> bytes:
    head = (
        b"From: <bench-sender@example.com>\r\nTo: <rcpt@example.com>\r\n"
        b"Subject: latency probe\r\nMessage-ID: <probe@bench.example>\r\n\r\n"
    )
    line = b"x" * 78 + b"\r\n"
    return head + line * (size // len(line) + 1)


class Probe(threading.Thread):
    """One LMTP session timing the final dot -> last reply, message after message."""

    def __init__(self, port: int, rcpts: int, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.rcpts, self.data = port, rcpts, message(size)
        self.samples: list[float] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
                # Without it the final dot (a small write after the data) waits for the
                # server's delayed ACK: ~40 ms of the probe's own making in every sample.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                f = s.makefile("rb")
                self._reply(f)
                s.sendall(b"LHLO probe.example\r\n")
                self._reply(f)
                while not self.stopping.is_set():
                    self._one(s, f)
                    time.sleep(0.01)
                s.sendall(b"QUIT\r\n")
        except OSError:
            self.failures += 1

    def _reply(self, f) -> bytes:  # type: ignore[no-untyped-def]
        while True:
            line = f.readline()
            if not line or line[3:4] != b"-":
                return line

    def _one(self, s: socket.socket, f) -> None:  # type: ignore[no-untyped-def]
        cmds = b"MAIL FROM:<probe@example.com>\r\n"
        cmds += b"".join(b"RCPT TO:<%drcpt@example.com>\r\n" % i for i in range(self.rcpts))
        s.sendall(cmds + b"DATA\r\n")
        for _ in range(self.rcpts + 2):
            self._reply(f)
        s.sendall(self.data)
        start = time.perf_counter()
        s.sendall(b".\r\n")
        ok = True
        for _ in range(self.rcpts):
            ok &= self._reply(f).startswith(b"250")
        self.samples.append(time.perf_counter() - start)
        self.failures += not ok


@dataclass
class Result:
    label: str
    workload: str
    wall: float
    deliveries: float
    messages: float
    p50_ms: float
    p99_ms: float
    cpu: float
    idle_mib: float
    peak_mib: float
    failed: int
    http_requests: int
    extra: dict[str, object] = field(default_factory=dict)


def run_workload(server: Server, sink: Sink, name: str) -> Result:
    sessions, count, rcpts, size = WORKLOADS[name]
    args = [SMTP_SOURCE, "-L", "-A", "-d", "-s", str(sessions), "-m", str(count)]
    args += ["-r", str(rcpts), "-l", str(size), "-f", "bench-sender@example.com"]
    args += ["-t", "rcpt@example.com", "-M", "bench.example", f"127.0.0.1:{server.port}"]
    idle = server.rss_kib()
    server.reset_peak()
    cpu0, http0 = server.cpu(), sink.requests()
    probe = Probe(server.port, rcpts, size)
    probe.start()
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, timeout=900)
    wall = time.perf_counter() - started
    probe.stopping.set()
    probe.join(120)
    cpu1 = server.cpu()
    time.sleep(0.2)
    http = sink.requests() - http0 - 1
    failed = done.stderr.count(b"rejected") + (1000000 if done.returncode else 0)
    lat = sorted(probe.samples) or [float("nan")]
    return Result(
        label=server.label,
        workload=name,
        wall=wall,
        deliveries=count * rcpts / wall,
        messages=count / wall,
        p50_ms=1000 * lat[len(lat) // 2],
        p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        cpu=cpu1 - cpu0,
        idle_mib=idle / 1024,
        peak_mib=server.peak_kib() / 1024,
        failed=failed + probe.failures,
        http_requests=http,
        extra={"probe_samples": len(probe.samples)},
    )


def warm_up(server: Server) -> None:
    args = [SMTP_SOURCE, "-L", "-d", "-s", "5", "-m", "100", "-l", "4096"]
    args += ["-f", "w@example.com", "-t", "rcpt@example.com", f"127.0.0.1:{server.port}"]
    subprocess.run(args, capture_output=True, timeout=120, check=True)


# --- report -----------------------------------------------------------------------------------


def report(results: list[Result], workloads: str, labels: list[str]) -> str:
    out = [
        "| wl | server | deliveries/s | msgs/s | p50 ms | p99 ms | CPU s | CPU ms/delivery "
        "| idle MiB | peak MiB | failed | ratio vs peer (rounds) | vs go |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wl in workloads:
        _sessions, count, rcpts, _size = WORKLOADS[wl]
        for label in labels:
            rows = [r for r in results if r.label == label and r.workload == wl]
            if not rows:
                continue

            def med(attr: str, rows: list[Result] = rows) -> float:
                return statistics.median(getattr(r, attr) for r in rows)

            ratios = []
            for i, r in enumerate(rows):
                peers = [p for p in results if p.label == "peer" and p.workload == wl]
                if label != "peer" and i < len(peers):
                    ratios.append(r.deliveries / peers[i].deliveries)
            ratio = (
                f"**{statistics.median(ratios):.2f}x** ({' '.join(f'{x:.2f}' for x in ratios)})"
                if ratios
                else "-"
            )
            gos = [g.deliveries for g in results if g.label == "go" and g.workload == wl]
            vs_go = "-"
            if gos and label != "go":  # same-round ratios, as for the peer
                pairs = [r.deliveries / g for r, g in zip(rows, gos, strict=False)]
                vs_go = f"{statistics.median(pairs):.2f}x"
            cpu_ms = 1000 * med("cpu") / (count * rcpts)
            out.append(
                f"| {wl} | {label} | {med('deliveries'):.0f} | {med('messages'):.1f} "
                f"| {med('p50_ms'):.1f} | {med('p99_ms'):.1f} | {med('cpu'):.2f} | {cpu_ms:.2f} "
                f"| {med('idle_mib'):.0f} | {med('peak_mib'):.0f} "
                f"| {sum(r.failed for r in rows)} | {ratio} | {vs_go} |"
            )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="abcde")
    ap.add_argument(
        "--servers",
        default="json,raw,peer",
        help="comma-separated: json, raw (the bridge with that payload), json-httpx, raw-httpx "
        "(httpx's default transport), json-wN/raw-wN (--workers N), json-verify/raw-verify "
        "(verify_url at the sink: recipient verification with a warm cache), json-msg/raw-msg "
        "(delivery = message: one request per message), options combined (json-msg-w2); "
        "peer, go (the Go peer, if built); any "
        "bridge label@DIR: the bridge of the checkout in DIR (json@/tmp/main: before/after in "
        "one run)",
    )
    ap.add_argument("--out", default="/tmp/lmtp-bench-results.json")
    args = ap.parse_args()
    for tool in (SMTP_SOURCE, shutil.which("nginx") or "/usr/sbin/nginx", str(BRIDGE)):
        if not os.path.exists(tool):
            print(
                f"missing {tool}: run bench/setup.sh (and ./test.sh for the venv)", file=sys.stderr
            )
            return 2
    labels = args.servers.split(",")
    results: list[Result] = []
    print(f"# {time.strftime('%FT%T')} {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
    with Sink() as sink:
        for rnd in range(1, args.rounds + 1):
            for label in labels:
                if label == "peer":
                    server = peer_server(sink)
                elif label == "go":
                    server = go_server(sink)
                else:
                    name, _, tree = label.partition("@")
                    payload, *options = name.split("-")
                    transport = "httpx" if "httpx" in options else "h11"
                    counts = [int(o[1:]) for o in options if o[:1] == "w" and o[1:].isdigit()]
                    server = bridge_server(
                        label,
                        sink,
                        payload,
                        counts[0] if counts else 1,
                        transport,
                        verify="verify" in options,
                        tree=tree,
                        per_message="msg" in options,
                    )
                server.start()
                try:
                    warm_up(server)
                    for wl in args.workloads:
                        r = run_workload(server, sink, wl)
                        results.append(r)
                        print(
                            f"round {rnd} {label:>10} {wl}: {r.deliveries:8.1f} deliveries/s "
                            f"p50 {r.p50_ms:7.1f} ms p99 {r.p99_ms:7.1f} ms cpu {r.cpu:6.2f} s "
                            f"peak {r.peak_mib:6.0f} MiB failed {r.failed} http {r.http_requests}",
                            flush=True,
                        )
                finally:
                    server.stop()
    Path(args.out).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    print()
    print(report(results, args.workloads, labels))
    print(f"\n(raw results: {args.out}; load average now {os.getloadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
