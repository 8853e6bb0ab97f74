"""docs/webhooks.md: its Python verification example works on what the bridge really signs."""

from __future__ import annotations

import json
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bridge.base.route import Route
from bridge.base.transaction import Envelope, MessageBuffer, Recipient
from bridge.delivery.verify import cache_seconds
from bridge.webhook.client import map_response
from bridge.webhook.payload import build_message_body
from bridge.webhook.signing import Signer, delivery_id
from bridge.webhook.verdicts import read_verdicts

DOC = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def python_example() -> dict[str, Any]:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


# What the bridge really sends: UTF-8 JSON, a multipart body with a binary file part, a raw
# message with 8-bit bytes that are not UTF-8 (the ones standardwebhooks 1.1.0 fails on).
BODIES = {
    "json": '{"version":1,"message":{"subject":"Grüße"}}'.encode(),
    "multipart-binary": (
        b'--b\r\nContent-Disposition: form-data; name="attachment"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) + b"\r\n--b--\r\n"
    ),
    "raw-8bit": (
        b"Subject: caf\xe9\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n\xff\xfe\x80\r\n"
    ),
}


@pytest.mark.parametrize("kind", BODIES)
def test_python_example_verifies_a_bridge_signature_and_refuses_a_forgery(kind: str) -> None:
    example = python_example()
    body = BODIES[kind]
    headers = dict(Signer([example["SECRET"]]).headers("msg_abc", [body]))
    example["verify"](body, headers)
    assert example["signature_status"](body, headers) == 200
    with pytest.raises(WebhookVerificationError):
        example["verify"](body + b" ", headers)
    assert example["signature_status"](body[:-1] + b"\x00", headers) == 401
    other = "whsec_" + "A" * 32
    forged = dict(Signer([other]).headers("msg_abc", [body]))
    with pytest.raises(WebhookVerificationError):
        example["verify"](body, forged)
    assert example["signature_status"](body, forged) == 401


def test_the_minimum_standardwebhooks_version_is_the_one_tested() -> None:
    """The doc names 1.3 as the minimum; the test extra pins it as its lower bound, so these tests
    run against a version the doc vouches for (1.3.0 was, when written, the oldest that works)."""
    assert '"standardwebhooks>=1.3"' in DOC.read_text()
    pyproject = (DOC.parent.parent / "pyproject.toml").read_text()
    assert '"standardwebhooks>=1.3,<2"' in pyproject
    installed = tuple(int(p) for p in version("standardwebhooks").split(".")[:2])
    assert installed >= (1, 3)


def test_python_example_answers_verify_questions_as_the_bridge_signs_them() -> None:
    example = python_example()
    signer = Signer([example["SECRET"]])

    def ask(rcpt: str, secret_signer: Signer = signer) -> tuple[int, dict[str, str], str]:
        body = json.dumps(
            {"type": "recipient.verify", "rcpt": rcpt, "mail_from": "", "route": "default"}
        ).encode()
        headers = dict(secret_signer.headers("vrfy_abc", [body]))
        answer: tuple[int, dict[str, str], str] = example["answer_verify"](body, headers)
        return answer

    assert ask("Bob@example.org")[:2] == (200, {"Cache-Control": "max-age=600"})
    status, headers, text = ask("ghost@example.org")
    assert (status, text) == (404, "no such mailbox")
    assert cache_seconds(headers["Cache-Control"], 0) == 60
    assert ask("bob@example.org", Signer(["whsec_" + "A" * 32]))[0] == 401
    # and the bridge reads those answers as the doc says
    assert map_response(404, text, None, {}).status == "5.1.1"


def test_doc_names_every_envelope_and_message_field() -> None:
    text = DOC.read_text()
    for name in (
        "rcpt_local", "rcpt_domain", "rcpt_user", "rcpt_tag", "text_charset", "html_charset",
        "auth", "defects", "content_id", "X-Lmtp-Reply", "Idempotency-Key", "{rcpt}", "{tag}",
        "http_retry_budget", "breaker_min_calls", "lmtp_bridge_circuit_breaker_state",
        "verify_url", "verify_on_error", "verify_cache_ttl", "verify_negative_ttl",
        "recipient.verify", "lmtp_bridge_verify_requests_total",
        'delivery = "message"', "envelope.recipients", "max_verdicts_size",
    ):  # fmt: skip
        assert name in text, name


def test_python_example_answers_a_per_message_delivery_with_verdicts() -> None:
    example = python_example()
    envelope = Envelope("alice@example.org", "mx.example.org", "192.0.2.1", None, False, None)
    route = Route(name="default", url="http://127.0.0.1/hook", delivery="message")
    buffer = MessageBuffer(1 << 20)
    buffer.write(b"Subject: hi\r\n\r\nHello.\r\n")
    rcpts = [Recipient(a, route) for a in ("bob@example.org", "ghost@example.org")]
    ids = [delivery_id(buffer.digest(), r.address) for r in rcpts]
    body = b"".join(
        build_message_body(
            "json", envelope, list(zip(rcpts, ids, strict=True)), buffer, None, "msg_req", "h"
        ).chunks()
    )
    headers = dict(Signer([example["SECRET"]]).headers("msg_req", [body]))

    status, answer_headers, text = example["answer_message"](body, headers)

    assert (status, answer_headers) == (200, {"Content-Type": "application/json"})
    ok = map_response(200, "", None, {})
    replies = read_verdicts(text.encode(), False, [r.address for r in rcpts], ok, {})
    assert [str(r)[:9] for r in replies] == ["250 2.0.0", "550 5.1.1"]
    assert example["answer_message"](body, {**headers, "webhook-id": "forged"})[0] == 401


README = DOC.parent.parent / "README.md"


@pytest.mark.parametrize("tool", ["python3", "openssl"])
def test_readme_one_liners_make_secrets_that_sign_and_verify(tool: str) -> None:
    """The README's ways to make a whsec_ secret, run as a user would: the bridge takes the
    result, and the reference library verifies what the bridge signs with it."""
    commands = re.findall(r"`((?:python3 -c|echo) [^`]*whsec_[^`]*)`", README.read_text())
    (command,) = {c for c in commands if c.startswith("python3" if tool == "python3" else "echo")}
    if tool == "openssl":
        assert "openssl rand -base64 24" in command
    made = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{32}", made), made
    body = b"\xff binary \x00 body"
    headers = dict(Signer([made]).headers("msg_abc", [body]))
    Webhook(made).verify(body, headers, json_parse=False)
