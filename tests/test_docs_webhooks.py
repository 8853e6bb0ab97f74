"""docs/webhooks.md: its Python verification example works on what the bridge really signs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from bridge.webhook.signing import Signer

DOC = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def python_example() -> dict[str, Any]:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_python_example_verifies_a_bridge_signature_and_refuses_a_forgery() -> None:
    example = python_example()
    body = '{"version":1,"message":{"subject":"Grüße"}}'.encode()
    headers = dict(Signer([example["SECRET"]]).headers("msg_abc", [body]))
    example["verify"](body, headers)
    with pytest.raises(WebhookVerificationError):
        example["verify"](body + b" ", headers)
    other = "whsec_" + "A" * 32
    forged = dict(Signer([other]).headers("msg_abc", [body]))
    with pytest.raises(WebhookVerificationError):
        example["verify"](body, forged)


def test_doc_names_every_envelope_and_message_field() -> None:
    text = DOC.read_text()
    for name in (
        "rcpt_local", "rcpt_domain", "rcpt_user", "rcpt_tag", "text_charset", "html_charset",
        "auth", "defects", "content_id", "X-Lmtp-Reply", "Idempotency-Key", "{rcpt}", "{tag}",
        "http_retry_budget", "breaker_threshold", "lmtp_bridge_circuit_breaker_state",
    ):  # fmt: skip
        assert name in text, name
