"""The `lmtp-bridge` command: serve (the default), demo, check-config, send, --version.

Settings are loaded and checked once, before trio starts. Every failure a user can cause is one
line naming what and where, no traceback (unless --log-level DEBUG), and one of these exit codes:
0 done; 1 cannot start (an address in use, a file that cannot be read) or, for send, a recipient
refused or the server unreachable; 2 a bad configuration or command line; 75 (send) deferred.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from email.utils import formatdate, make_msgid

import trio

from bridge import __version__
from bridge.base.listen import naming_listen_errors, parse_listen
from bridge.config import (
    ConfigError,
    Settings,
    load_settings,
    redact_url,
    redacted_dump,
    unknown_env_vars,
)

EXIT_START = 1  # cannot start: an address in use, an unreadable file (one line says which)
EXIT_CONFIG = 2  # invalid settings or command line
DEMO_RECEIVER_PORT = 8025
COMMANDS = ("serve", "demo", "check-config", "send")
log = logging.getLogger("bridge")


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML settings file")
    parser.add_argument(
        "--listen",
        action="extend",
        nargs="+",
        metavar="ADDR",
        help="HOST:PORT, [V6]:PORT or unix:/path: one or more, space- or comma-separated, "
        "the flag repeatable (replaces LMTP_BRIDGE_LISTEN)",
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
    check = sub.add_parser(
        "check-config",
        help="validate and print the effective settings (takes serve's flags)",
        description="Validate the settings serve would use with the same flags and environment, "
        "print them with secrets redacted; exit 0, or 2 with one line per problem.",
    )
    _add_server_flags(check)
    send = sub.add_parser("send", help="send a message over LMTP and print each recipient's reply")
    send.add_argument("--to", action="append", required=True, metavar="RCPT")
    send.add_argument("--from", dest="sender", default="sender@example.org", metavar="ADDR")
    send.add_argument("--server", default="127.0.0.1:2424", metavar="ADDR")
    send.add_argument("--subject", default="Hello from lmtp-bridge send")
    send.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    send.add_argument("--log-level", metavar="LEVEL", help="DEBUG: a traceback with each error")
    send.add_argument("file", nargs="?", help="RFC 5322 message file, or - for stdin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # serve is the default command: bare `lmtp-bridge`, or serve's flags without the word.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "send":
            return _send(args)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "demo":
            return _demo(args)
        settings = _load(args)
        if settings is None:
            return EXIT_CONFIG
        return _serve(settings)
    except KeyboardInterrupt:
        return 130


def _check_config(args: argparse.Namespace) -> int:
    unknown = unknown_env_vars()
    for line in unknown:
        print(f"lmtp-bridge: config: {line}", file=sys.stderr)
    settings = _load(args)
    if settings is None or unknown:
        return EXIT_CONFIG
    _print(json.dumps(redacted_dump(settings), indent=2))
    return 0


def _print(text: str) -> None:
    """Print to stdout; a reader that stopped early (`check-config | head`) is no error: the exit
    status reports the command's outcome, not the pipe's."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _warn_unknown_env() -> None:
    for line in unknown_env_vars():
        log.warning("config: %s; ignored", line)


def _start_failures(exc: BaseException) -> list[str] | None:
    """The one-line reasons when ``exc`` (perhaps an exception group from the nurseries) is
    nothing but start-up OSErrors (addresses in use, files that cannot be read); else None."""
    if isinstance(exc, BaseExceptionGroup):
        reasons: list[str] = []
        for inner in exc.exceptions:
            found = _start_failures(inner)
            if found is None:
                return None
            reasons.extend(found)
        return reasons
    if isinstance(exc, trio.Cancelled):
        return []
    if isinstance(exc, OSError):
        text = str(exc)  # a ListenError names the address and the setting
        if exc.strerror:
            text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        return [" ".join(text.split())]
    return None


def _run_trio(fn, *args: object) -> int:  # type: ignore[no-untyped-def]
    """trio.run(fn, *args): 0, or EXIT_START after one log line per start-up failure."""

    def start() -> int:
        trio.run(fn, *args)
        return 0

    return _explaining_start_failures(start)


def _explaining_start_failures(start: Callable[[], int]) -> int:
    """``start()``'s exit status, or EXIT_START after one log line per start-up failure (the
    traceback only at DEBUG); any other exception goes on."""
    try:
        return start()
    except BaseException as exc:
        reasons = _start_failures(exc)
        if not reasons:
            raise
        log.debug("start-up failure", exc_info=exc)
        for reason in dict.fromkeys(reasons):
            log.critical("cannot start: %s", reason)
        return EXIT_START


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
        "listen": _listen_flags(getattr(args, "listen", None)),
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
    _warn_unknown_env()
    if settings.workers > 1:
        from bridge import workers  # before bridge.app: metrics must be made multiprocess

        return _explaining_start_failures(lambda: workers.serve(settings))
    from bridge.app import run

    return _run_trio(run, settings)


def _listen_flags(values: list[str] | None) -> list[str] | None:
    """``--listen A B --listen C,D`` -> [A, B, C, D] (the variable takes commas, so does this)."""
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _demo(args: argparse.Namespace) -> int:
    from bridge.demo import demo_handler
    from bridge.ops.httpserver import serve_http
    from bridge.ops.logs import configure_logging

    receiver = f"http://127.0.0.1:{args.receiver_port}/hook"
    loaded = _load(args, quiet_about_webhook=True) or _load(args, {"webhook_url": receiver})
    if loaded is None:
        return EXIT_CONFIG
    settings: Settings = loaded
    configure_logging(settings.log_format or "text", settings.log_level)
    _warn_unknown_env()
    secrets = [s.get_secret_value() for s in settings.webhook_secret]
    where = f"127.0.0.1:{args.receiver_port}"

    async def demo() -> None:
        nonlocal settings, receiver
        async with trio.open_nursery() as nursery:
            with naming_listen_errors("the demo receiver (--receiver-port)", where):
                port = await nursery.start(
                    serve_http, demo_handler(sys.stdout, secrets), "127.0.0.1", args.receiver_port
                )
            if port != args.receiver_port:  # --receiver-port 0: the port the system chose
                bound = f"http://127.0.0.1:{port}/hook"
                if settings.webhook_url == receiver:
                    settings = settings.model_copy(update={"webhook_url": bound})
                receiver = bound
            # the receiver stops when the bridge has drained
            await nursery.start(_run_and_cancel, settings, nursery.cancel_scope, receiver)

    return _run_trio(demo)


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

    debug = (args.log_level or "").upper() == "DEBUG"

    def fail(text: str, code: int, exc: BaseException | None = None) -> int:
        if debug and exc is not None:
            logging.basicConfig()
            log.error("send failed", exc_info=exc)
        print(f"lmtp-bridge send: {text}", file=sys.stderr)
        return code

    try:
        server = parse_listen(args.server)
    except ValueError as exc:
        return fail(f"--server {exc}", EXIT_CONFIG, exc)
    try:
        if args.file == "-":
            message = sys.stdin.buffer.read()
        elif args.file:
            with open(args.file, "rb") as f:
                message = f.read()
        else:
            message = _sample_message(args.sender, args.to, args.subject)
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror or exc}", EXIT_CONFIG, exc)
    try:
        result = send(server, args.sender, args.to, message, timeout=args.timeout)
    except (OSError, LmtpClientError) as exc:
        return fail(f"{server}: {_reason(exc)}", 1, exc)
    for rcpt, reply in result.replies:
        _print(f"{rcpt}: {reply}")
    return result.exit_code


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out (--timeout)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _sample_message(sender: str, recipients: list[str], subject: str) -> bytes:
    author = sender.strip().removeprefix("<").removesuffix(">") or "MAILER-DAEMON@localhost"
    return (
        f"From: <{author}>\r\n"
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
