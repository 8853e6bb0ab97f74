"""The `lmtp-bridge` command: serve, demo, check-config, send, --version.

Settings are loaded and checked once, before trio starts; a bad configuration exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from email.utils import formatdate, make_msgid

import trio

from bridge import __version__
from bridge.config import ConfigError, Settings, load_settings, redact_url, redacted_dump

EXIT_CONFIG = 2
DEMO_RECEIVER_PORT = 8025


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML settings file")
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="HOST:PORT, [V6]:PORT or unix:/path (repeatable; replaces LMTP_BRIDGE_LISTEN)",
    )
    parser.add_argument("--webhook-url", metavar="URL", help="the default route's URL")
    parser.add_argument("--payload", choices=("json", "raw", "multipart"))
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help='"" disables')
    parser.add_argument("--log-level", metavar="LEVEL")
    parser.add_argument("--log-format", choices=("json", "text"))
    parser.add_argument(
        "--workers",
        metavar="N",
        help='worker processes (SO_REUSEPORT; serve only); "auto": one per usable CPU',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtp-bridge",
        description="LMTP server that POSTs each recipient's copy of a message to a webhook.",
    )
    parser.add_argument("--version", action="version", version=f"lmtp-bridge {__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_server_flags(sub.add_parser("serve", help="run the server (the default)"))
    demo = sub.add_parser("demo", help="the server plus a built-in receiver that prints deliveries")
    _add_server_flags(demo)
    demo.add_argument(
        "--receiver-port", type=int, default=DEMO_RECEIVER_PORT, help="demo receiver port"
    )
    check = sub.add_parser("check-config", help="validate and print the effective settings")
    check.add_argument("--config", metavar="FILE")
    send = sub.add_parser("send", help="send a message over LMTP and print each recipient's reply")
    send.add_argument("--to", action="append", required=True, metavar="RCPT")
    send.add_argument("--from", dest="sender", default="sender@example.org", metavar="ADDR")
    send.add_argument("--server", default="127.0.0.1:2424", metavar="ADDR")
    send.add_argument("--subject", default="Hello from lmtp-bridge send")
    send.add_argument("file", nargs="?", help="RFC 5322 message file, or - for stdin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    if command == "send":
        return _send(args)
    if command == "check-config":
        settings = _load(args)
        if settings is None:
            return EXIT_CONFIG
        print(json.dumps(redacted_dump(settings), indent=2))
        return 0
    if command == "demo":
        return _demo(args)
    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    return _serve(settings)


def _load(
    args: argparse.Namespace,
    extra: dict[str, object] | None = None,
    *,
    quiet_about_webhook: bool = False,
) -> Settings | None:
    """The settings, or None after printing one line per problem to stderr.

    With ``quiet_about_webhook``, a configuration whose only fault is a missing webhook
    URL returns None silently (the demo then supplies its own receiver).
    """
    overrides: dict[str, object] = {
        "listen": getattr(args, "listen", None),
        "webhook_url": getattr(args, "webhook_url", None),
        "payload": getattr(args, "payload", None),
        "metrics_listen": getattr(args, "metrics_listen", None),
        "log_level": getattr(args, "log_level", None),
        "log_format": getattr(args, "log_format", None),
        "workers": getattr(args, "workers", None),
        **(extra or {}),
    }
    try:
        return load_settings(args.config, overrides)
    except ConfigError as exc:
        if quiet_about_webhook and all(p.startswith("webhook_url:") for p in exc.problems):
            return None
        for problem in exc.problems:
            print(f"lmtp-bridge: config: {problem}", file=sys.stderr)
        return None


def _serve(settings: Settings) -> int:
    from bridge.ops.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        from bridge import workers  # before bridge.app: metrics must be made multiprocess

        try:
            return workers.serve(settings)
        except OSError as exc:
            logging.getLogger("bridge").critical("cannot start: %s", exc)
            return 1
    from bridge.app import run

    try:
        trio.run(run, settings)
    except OSError as exc:
        logging.getLogger("bridge").critical("cannot start: %s", exc)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from bridge.demo import demo_handler
    from bridge.ops.httpserver import serve_http
    from bridge.ops.logs import configure_logging

    receiver = f"http://127.0.0.1:{args.receiver_port}/hook"
    settings = _load(args, quiet_about_webhook=True) or _load(args, {"webhook_url": receiver})
    if settings is None:
        return EXIT_CONFIG
    configure_logging(settings.log_format or "text", settings.log_level)
    secrets = [s.get_secret_value() for s in settings.webhook_secret]

    async def demo() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_http, demo_handler(sys.stdout, secrets), "127.0.0.1", args.receiver_port
            )
            # the receiver stops when the bridge has drained
            await nursery.start(_run_and_cancel, settings, nursery.cancel_scope, receiver)

    try:
        trio.run(demo)
    except OSError as exc:
        logging.getLogger("bridge").critical("cannot start: %s", exc)
        return 1
    return 0


async def _run_and_cancel(
    settings: Settings,
    scope: trio.CancelScope,
    receiver: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    from bridge.app import Running, run

    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(run, settings)
        where = running.lmtp_addresses[0]
        webhook = redact_url(settings.webhook_url or receiver)
        print(
            f"\nlmtp-bridge demo: LMTP on {where}, webhook {webhook}\n"
            f"try:  .venv/bin/lmtp-bridge send --server {where} --to someone@example.org\n"
            f"      (status-503@example.org shows a deferral, status-404@... a bounce)\n",
            flush=True,
        )
        task_status.started()
    scope.cancel()


def _send(args: argparse.Namespace) -> int:
    from bridge.client import LmtpClientError, send

    if args.file == "-":
        message = sys.stdin.buffer.read()
    elif args.file:
        with open(args.file, "rb") as f:
            message = f.read()
    else:
        message = _sample_message(args.sender, args.to, args.subject)
    try:
        result = send(args.server, args.sender, args.to, message)
    except (OSError, LmtpClientError) as exc:
        print(f"lmtp-bridge send: {exc}", file=sys.stderr)
        return 1
    for rcpt, reply in result.replies:
        print(f"{rcpt}: {reply}")
    return result.exit_code


def _sample_message(sender: str, recipients: list[str], subject: str) -> bytes:
    return (
        f"From: <{sender}>\r\n"
        f"To: {', '.join(f'<{r}>' for r in recipients)}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(localtime=True)}\r\n"
        f"Message-ID: {make_msgid(domain='lmtp-bridge.invalid')}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "This is a test message sent by `lmtp-bridge send`.\r\n"
    ).encode()


if __name__ == "__main__":
    sys.exit(main())
