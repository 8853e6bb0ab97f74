#!/usr/bin/env python3
"""The parse of hostile messages (issue 15), one per subprocess: wall time and peak memory.

    .venv/bin/python bench/hostile_parse.py               # every case
    .venv/bin/python bench/hostile_parse.py subject_ew_16k to_25k_comment

Each case runs ParsedMessage.parse and the json message body in a fresh interpreter with an
address-space cap (--cap-mib, default 3072: a runaway fails with MemoryError instead of
bringing the OOM killer onto a shared machine) and a wall-clock cap (--timeout). It prints the
parse's wall time, the process's peak RSS (VmHWM) above its RSS before the parse, and the
defects that name a limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

HEAD = b"From: a@example.org\r\nTo: b@example.org\r\nMessage-ID: <x@example.org>\r\n"


def _fold(words: list[bytes], first: bytes) -> bytes:
    """Header ``first`` + words, folded at about 76 columns."""
    lines, line = [], first
    for w in words:
        if len(line) + len(w) + 1 > 76 and line.strip():
            lines.append(line)
            line = b" " + w
        else:
            line = line + b" " + w if line else w
    lines.append(line)
    return b"\r\n".join(lines) + b"\r\n"


def subject_encoded_words(n: int) -> bytes:
    words = [b"=?utf-8?q?abc=C3=A9def?=" for _ in range(n)]
    return HEAD + _fold(words, b"Subject:") + b"\r\nbody\r\n"


def to_many_with_comment(n: int) -> bytes:
    words = [b"u%d@example.org," % i for i in range(n - 1)]
    words.append(b"last@example.org (a comment)")
    return (
        b"From: a@example.org\r\nMessage-ID: <x@example.org>\r\n"
        + _fold(words, b"To:")
        + b"Subject: hi\r\n\r\nbody\r\n"
    )


def charset_body(charset: str, size: int, body: bytes = b"hello world, ") -> bytes:
    body = (body * (size // len(body) + 1))[:size]
    return (
        HEAD
        + b"Subject: c\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset="
        + charset.encode()
        + b"\r\n\r\n"
        + body
        + b"\r\n"
    )


def nested_multiparts(depth: int) -> bytes:
    out = [HEAD, b"Subject: n\r\nMIME-Version: 1.0\r\n"]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\ndeep\r\n")
    for i in reversed(range(depth)):
        out.append(b"--b%d--\r\n" % i)
    return b"".join(out)


def many_parts(n: int) -> bytes:
    out = [
        HEAD,
        b'Subject: p\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n',
    ]
    for i in range(n):
        out.append(b"--b\r\nContent-Type: text/plain\r\n\r\n%d\r\n" % i)
    out.append(b"--b--\r\n")
    return b"".join(out)


def many_headers(n: int) -> bytes:
    return HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(n)) + b"Subject: h\r\n\r\nbody\r\n"


def utf7_surrogate() -> bytes:
    return HEAD + b"Subject: s\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n+2D0-\r\n"


CASES: dict[str, Callable[[], bytes]] = {
    "subject_ew_16k": lambda: subject_encoded_words(16_000),
    "subject_ew_60k": lambda: subject_encoded_words(60_000),
    "to_25k_comment": lambda: to_many_with_comment(25_000),
    "punycode_250k": lambda: charset_body("punycode", 250_000),
    # the decoder's insertions are quadratic: 20 KB of this took 0.7 s
    "punycode_100k_dash": lambda: charset_body("punycode", 100_000, b"-" + b"ab" * 50_000),
    "nested_5000": lambda: nested_multiparts(5_000),
    "parts_100k": lambda: many_parts(100_000),
    "headers_100k": lambda: many_headers(100_000),
    "utf7_surrogate": utf7_surrogate,
}


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _child(name: str, cap: int) -> None:
    import resource
    import time

    data = CASES[name]()
    import orjson

    from bridge.mail.parsed import ParsedMessage

    try:
        from bridge.webhook.render import message_json
    except ImportError:  # before the rendering left bridge/mail

        def message_json(parsed: ParsedMessage) -> bytes:
            return parsed.message_json()  # type: ignore[attr-defined, no-any-return]

    message_json(ParsedMessage.parse(HEAD + b"\r\nwarm\r\n"))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    try:
        parsed = ParsedMessage.parse(data)
        t1 = time.perf_counter()
        body = message_json(parsed)
        t2 = time.perf_counter()
        orjson.loads(body)  # strict: a lone surrogate fails here
        fields = orjson.loads(body)
        result = {
            "parse_s": round(t1 - t0, 3),
            "render_s": round(t2 - t1, 3),
            "text": len(fields.get("text") or ""),
            "subject": len(fields.get("subject") or ""),
            "to": len(fields.get("to") or []),
            "attachments": len(fields.get("attachments") or []),
            "defects": [d for d in parsed.defects if "limit" in d or "charset" in d][:4],
            "n_defects": len(parsed.defects),
        }
    except BaseException as exc:  # MemoryError under the cap, a strict-JSON failure
        result = {
            "error": f"{type(exc).__name__}: {str(exc)[:120]}",
            "after_s": round(time.perf_counter() - t0, 3),
        }
    import bridge

    result["src"] = os.path.dirname(bridge.__file__)
    result["size"] = len(data)
    result["peak_mib"] = round((_vm("VmHWM") - before) / 2**20, 1)
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--cap-mib", type=int, default=3072)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument(
        "--source",
        default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        help="the checkout whose bridge/ is measured (e.g. /work/main for a before figure)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.cap_mib << 20)
        return
    for name in args.cases:
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, "--cap-mib", str(args.cap_mib)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env={**os.environ, "PYTHONPATH": args.source},
            )
            line = (
                out.stdout.strip().splitlines()[-1]
                if out.stdout.strip()
                else out.stderr.strip()[-300:]
            )
        except subprocess.TimeoutExpired:
            line = f"timeout after {args.timeout} s"
        print(f"{name:16} {line}", flush=True)


if __name__ == "__main__":
    main()
