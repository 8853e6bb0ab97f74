"""Recipient verification with a real Postfix in front (SPEC 7): its smtpd, on a loopback port,
runs ``reject_unverified_recipient``; its address-verification probes go through the same
``lmtp:`` transport to the bridge, which asks its verify webhook at RCPT. An unknown recipient
is refused while the SMTP client is still connected (nothing queued, no bounce); a known one is
accepted and delivered through the bridge exactly once; the probes never reach the delivery
webhook.
"""

from __future__ import annotations

import re
import smtplib
import socket
from email.message import EmailMessage

import pytest
from bridge_process import free_port, http_get, metric_value
from postfix_harness import Bridge, PrivatePostfix, transport_for, wait_until
from webhook_server import WebhookServer

pytestmark = pytest.mark.peer

SENDER = "alice@example.org"
KNOWN = "bob@example.org"
UNKNOWN = "ghost@example.org"

# The recipe of docs/postfix.md, with short waits for a test.
MAIN_CF = {
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    "smtpd_recipient_restrictions": "reject_unverified_recipient",
    "unverified_recipient_reject_code": "550",
    "address_verify_poll_delay": "1s",
    "address_verify_poll_count": "10",
}


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = KNOWN
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.org>"
    msg.set_content("Hello.\n")
    return msg


def smtp_send(port: int, rcpt: str, subject: str) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
        return smtp.send_message(message(subject), from_addr=SENDER, to_addrs=[rcpt])


def test_reject_unverified_recipient_refuses_unknown_at_smtp_rcpt_and_delivers_known_once(
    webhook_server: WebhookServer,
) -> None:
    with WebhookServer() as verify:
        verify.behave("*", status=404, body="no such mailbox")
        verify.behave(KNOWN, status=200)
        env = {"LMTP_BRIDGE_VERIFY_URL": verify.base_url + "/verify"}
        smtpd_port = free_port()
        with (
            Bridge(webhook_server.url, env) as bridge,
            PrivatePostfix(
                transport_for(bridge.wait_ready().address), MAIN_CF, smtpd_port=smtpd_port
            ) as postfix,
        ):
            wait_until(lambda: _listening(smtpd_port), 30, "Postfix's smtpd to listen")

            # the unknown recipient: 550 at RCPT, the SMTP client still connected
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                smtp_send(smtpd_port, UNKNOWN, "ghost")
            code, text = refused.value.recipients[UNKNOWN]
            assert code == 550, text
            assert b"Recipient address rejected: undeliverable address" in text
            assert b"550 5.1.1" in text  # the bridge's reply, quoted by Postfix

            # the known one: accepted, queued, delivered through the bridge
            assert smtp_send(smtpd_port, KNOWN, "bob") == {}
            sent = postfix.wait_outcomes(
                lambda found: any(o.status == "sent" for o in found), 60, "bob's delivery"
            )
            postfix.wait_queue_empty(30)
            log = postfix.log()
            metrics = http_get(f"{bridge.metrics_url}/metrics")[1]

        # Postfix: one delivery, for bob; the probes are "deliverable" / "undeliverable" lines
        assert [(o.rcpt, o.status) for o in sent if o.status == "sent"] == [(KNOWN, "sent")]
        probes = {(o.rcpt, o.status) for o in sent if o.status != "sent"}
        assert probes <= {(KNOWN, "deliverable"), (UNKNOWN, "undeliverable")}, probes
        assert re.search(rf"NOQUEUE: reject: RCPT from \S+: 550 5\.1\.1 <{UNKNOWN}>", log), log
        assert "status=bounced" not in log and "sender non-delivery notification" not in log
        assert not re.search(rf"\b[0-9A-F]+: to=<{UNKNOWN}>.* status=(sent|deferred)", log)

        # the delivery webhook: bob's copy, once; never a probe, never the ghost
        assert [r.rcpt for r in webhook_server.requests] == [KNOWN]
        assert webhook_server.requests[0].json()["envelope"]["mail_from"] == SENDER
        # the verify webhook: one question per recipient (the bridge's cache answered the
        # delivery's RCPT), asked by Postfix's probes (sender: double-bounce)
        asked = [(r.json()["rcpt"], r.json()["mail_from"]) for r in verify.requests]
        assert sorted(rcpt for rcpt, _ in asked) == [KNOWN, UNKNOWN], asked
        assert all(sender.startswith("double-bounce@") for _, sender in asked), asked
        labels = {"route": "default"}
        assert (
            metric_value(metrics, "lmtp_bridge_verify_cache_total", labels | {"hit": "true"}) == 1
        )
        _print_verify_lines(log)


@pytest.mark.parametrize("on_error", ["defer", "accept"])
def test_a_verify_webhook_that_is_down_follows_verify_on_error(
    webhook_server: WebhookServer, on_error: str
) -> None:
    env = {
        "LMTP_BRIDGE_VERIFY_URL": f"http://127.0.0.1:{free_port()}/verify",  # refused
        "LMTP_BRIDGE_VERIFY_ON_ERROR": on_error,
    }
    smtpd_port = free_port()
    with (
        Bridge(webhook_server.url, env) as bridge,
        PrivatePostfix(
            transport_for(bridge.wait_ready().address), MAIN_CF, smtpd_port=smtpd_port
        ) as postfix,
    ):
        wait_until(lambda: _listening(smtpd_port), 30, "Postfix's smtpd to listen")
        if on_error == "accept":
            assert smtp_send(smtpd_port, KNOWN, "unverified") == {}
            postfix.wait_outcomes(
                lambda found: any(o.status == "sent" for o in found), 60, "the delivery"
            )
            log = postfix.log()
            assert "status=deliverable (250 2.1.5 Recipient OK (not verified" in log, log
            assert [r.rcpt for r in webhook_server.requests] == [KNOWN]  # the delivery decided
            _print_verify_lines(log)
            return
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            smtp_send(smtpd_port, KNOWN, "later")
        code, text = refused.value.recipients[KNOWN]
        # Postfix's unverified_recipient_defer_code (450): the sender's MTA tries again later
        assert code == 450, text
        assert b"Recipient address rejected: unverified address" in text
        assert b"451 4.4.1" in text
        log = postfix.log()
    assert webhook_server.requests == []
    assert re.search(rf"NOQUEUE: reject: RCPT from \S+: 450 4\.1\.1 <{KNOWN}>", log), log
    _print_verify_lines(log)


def _print_verify_lines(log: str) -> None:
    """For the record (pytest -s): what Postfix logs in each case."""
    for line in log.splitlines():
        if "NOQUEUE" in line or "status=" in line:
            print(line)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
