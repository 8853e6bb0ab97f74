"""Postfix, a real MTA, delivering through the bridge (a subprocess) to a real webhook.

Each test runs a private Postfix instance (tests/postfix_harness.py): mail goes in with Postfix's
own ``sendmail``, and Postfix's log (``status=sent/deferred/bounced``) and its queue are the
oracle. Nothing listens on port 25; everything is on 127.0.0.1 or a unix socket.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import pytest
from bridge_process import (
    BridgeProcess,
    free_port,
    http_get,
    metric_value,
    short_tempdir,
    wait_for,
)
from postfix_harness import (
    Bridge,
    Outcome,
    PrivatePostfix,
    final_status,
    make_message,
    transport_for,
)
from webhook_server import RecordedRequest, Step, WebhookServer

pytestmark = pytest.mark.peer

SENDER = "sender@example.org"


@contextlib.contextmanager
def bridge_and_postfix(
    webhook: WebhookServer,
    bridge_env: Mapping[str, str] | None = None,
    main_cf: Mapping[str, str] | None = None,
    *,
    listen: str | None = None,
) -> Iterator[tuple[BridgeProcess, PrivatePostfix]]:
    with Bridge(webhook.url, bridge_env, listen=listen) as bridge:
        bridge.wait_ready()
        with PrivatePostfix(transport_for(bridge.address), main_cf) as postfix:
            yield bridge, postfix


def done_with(expected: Mapping[str, list[str]]) -> Callable[[list[Outcome]], bool]:
    """A check for wait_outcomes: every recipient has reached its expected statuses."""

    def check(outcomes: list[Outcome]) -> bool:
        seen = final_status(outcomes)
        return all(seen.get(rcpt, [])[: len(want)] == want for rcpt, want in expected.items())

    return check


def envelope(request: RecordedRequest) -> dict[str, object]:
    env = request.json()["envelope"]
    assert isinstance(env, dict)
    return env


def test_mixed_outcomes_give_sent_deferred_bounced_and_the_bounce_comes_back_through(
    webhook_server: WebhookServer,
) -> None:
    webhook_server.behave("ok@example.org", status=200)
    webhook_server.behave("later@example.org", [Step(status=503, body="busy"), Step(status=200)])
    webhook_server.behave("gone@example.org", status=404, body="no such mailbox")
    webhook_server.behave("full@example.org", status=413, body="too big for us")
    rcpts = ["ok@example.org", "later@example.org", "gone@example.org", "full@example.org"]
    with bridge_and_postfix(webhook_server) as (_bridge, postfix):
        postfix.sendmail(make_message("mixed@test"), SENDER, rcpts)
        expected = {
            "ok@example.org": ["sent"],
            "later@example.org": ["deferred", "sent"],
            "gone@example.org": ["bounced"],
            "full@example.org": ["bounced"],
            SENDER: ["sent"],  # Postfix's non-delivery notice, through the bridge
        }
        outcomes = postfix.wait_outcomes(done_with(expected), 60, "every recipient's outcome")
        postfix.wait_queue_empty(30)
        outcomes = postfix.outcomes()

    assert final_status(outcomes) == expected, outcomes
    by_rcpt = {(o.rcpt, o.status): o for o in outcomes}
    assert by_rcpt["ok@example.org", "sent"].dsn == "2.0.0"
    assert by_rcpt["later@example.org", "deferred"].dsn == "4.3.0"
    assert "503" in by_rcpt["later@example.org", "deferred"].text
    assert by_rcpt["gone@example.org", "bounced"].dsn == "5.1.1"
    assert "no such mailbox" in by_rcpt["gone@example.org", "bounced"].text
    assert by_rcpt["full@example.org", "bounced"].dsn == "5.3.4"

    # the webhook saw exactly: one POST each, two for the deferred one (same delivery id)
    assert len(webhook_server.requests_for("ok@example.org")) == 1
    later = webhook_server.requests_for("later@example.org")
    assert len(later) == 2
    assert later[0].headers["webhook-id"] == later[1].headers["webhook-id"]
    # the bounce: MAIL FROM:<> (mail_from ""), to the sender, naming both refused recipients
    (bounce,) = webhook_server.requests_for(SENDER)
    assert envelope(bounce)["mail_from"] == ""
    text = json.dumps(bounce.json()["message"])
    assert "gone@example.org" in text and "full@example.org" in text
    assert "5.1.1" in text


def test_a_success_notice_says_delivered_not_relayed(webhook_server: WebhookServer) -> None:
    """With ``flags=X`` on the lmtp service (Postfix >= 3.5; lmtp_assume_final before), Postfix
    takes the bridge for the final hop although it offers no DSN (without it: "relayed")."""
    with bridge_and_postfix(webhook_server, {"LMTP_BRIDGE_PAYLOAD": "raw"}) as (_b, postfix):
        msg = make_message("notify@test")
        postfix._run(
            "sendmail", "-C", str(postfix.config_dir), "-i", "-N", "success", "-f", SENDER,
            "--", "bob@example.org", input=msg,
        )  # fmt: skip
        postfix.wait_outcomes(done_with({SENDER: ["sent"]}), 30, "the success notice")
        postfix.wait_queue_empty(30)
    (notice,) = webhook_server.requests_for(SENDER)
    assert notice.headers["x-lmtp-mail-from"] == ""
    actions = [line for line in notice.body.split(b"\r\n") if line.startswith(b"Action:")]
    assert actions == [b"Action: delivered"], actions


def test_deferred_recipients_are_delivered_once_the_webhook_recovers(
    webhook_server: WebhookServer,
) -> None:
    webhook_server.behave("*", status=503, body="down for maintenance")
    rcpts = [f"user{i}@example.org" for i in range(5)]
    # five recipients failing with 503 open the bridge's circuit breaker (a minimum volume of 5
    # here): later tries are refused at RCPT (451) until a probe after the cool-down gets through
    env = {"LMTP_BRIDGE_BREAKER_COOLDOWN": "1", "LMTP_BRIDGE_BREAKER_MIN_CALLS": "5"}
    with bridge_and_postfix(webhook_server, env) as (_bridge, postfix):
        postfix.sendmail(make_message("recover@test"), SENDER, rcpts)
        postfix.wait_outcomes(
            lambda found: {o.rcpt for o in found if o.status == "deferred"} >= set(rcpts),
            30,
            "every recipient deferred",
        )
        assert postfix.queue(), "the message must stay queued while the webhook is down"
        webhook_server.behave("*", status=200)
        postfix.flush()
        postfix.wait_queue_empty(60)
        outcomes = postfix.outcomes()

    statuses = final_status(outcomes)
    for rcpt in rcpts:
        assert statuses[rcpt][-1] == "sent", statuses
        assert set(statuses[rcpt][:-1]) == {"deferred"}, statuses
        ids = {r.headers["webhook-id"] for r in webhook_server.requests_for(rcpt)}
        assert len(ids) == 1, f"{rcpt}: one delivery id across Postfix's retries, got {ids}"
    assert "bounced" not in {o.status for o in outcomes}


def test_over_a_unix_socket(webhook_server: WebhookServer) -> None:
    directory = short_tempdir()
    os.chmod(directory, 0o755)  # Postfix's lmtp client runs as user postfix
    socket_path = f"{directory}/lmtp.sock"
    rcpts = ["a@example.org", "b@example.org"]
    with bridge_and_postfix(webhook_server, listen=f"unix:{socket_path}") as (_b, postfix):
        for i in range(3):
            postfix.sendmail(make_message(f"unix{i}@test"), SENDER, rcpts)
        postfix.wait_queue_empty(60)
        outcomes = postfix.outcomes()
    assert [o.status for o in outcomes] == ["sent"] * 6, outcomes
    assert all(socket_path in o.relay for o in outcomes), outcomes
    assert len(webhook_server.requests) == 6


@pytest.mark.parametrize("smtputf8_enable", ["yes", "no"])
def test_8bit_and_utf8_mail(webhook_server: WebhookServer, smtputf8_enable: str) -> None:
    rcpt = "jösé@exämple.org" if smtputf8_enable == "yes" else "jösé@example.org"
    body = "Grüße aus Köln, 東京 and a café.\n".encode()
    msg = make_message(
        "utf8@test",
        subject="Grüße \u2013 8-bit header",
        body=body,
        headers={
            "X-Note": "naïve ✓",
            "MIME-Version": "1.0",
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Transfer-Encoding": "8bit",
        },
    )
    bridge_env = {"LMTP_BRIDGE_INCLUDE_RAW": "true"}
    main_cf = {"smtputf8_enable": smtputf8_enable}
    with bridge_and_postfix(webhook_server, bridge_env, main_cf) as (_bridge, postfix):
        postfix.sendmail(msg, "sénder@example.org", [rcpt])
        postfix.wait_queue_empty(60)
        outcomes = postfix.outcomes()

    # without SMTPUTF8 Postfix logs each non-ASCII octet of an address as "?"
    logged = rcpt if smtputf8_enable == "yes" else re.sub(r"[^\x00-\x7f]", "??", rcpt)
    assert [(o.rcpt, o.status) for o in outcomes] == [(logged, "sent")], outcomes
    (request,) = webhook_server.requests
    env = envelope(request)
    assert env["rcpt_to"] == rcpt
    assert env["mail_from"] == "sénder@example.org"
    assert env["body"] == "8BITMIME"
    # Postfix sends SMTPUTF8 only when it may (smtputf8_enable) and the envelope needs it
    assert env["smtputf8"] is (smtputf8_enable == "yes")
    message = request.json()["message"]
    assert message["subject"] == "Grüße \u2013 8-bit header"
    assert "Grüße aus Köln, 東京" in message["text"]
    assert ["X-Note", "naïve ✓"] in message["headers"]
    # the 8-bit octets arrive untouched: Postfix did not downgrade, the bridge did not recode
    raw = base64.b64decode(request.json()["raw"])
    assert body.replace(b"\n", b"\r\n") in raw
    assert "X-Note: naïve ✓".encode() in raw


def test_a_20_mib_message(webhook_server: WebhookServer) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n"  # 73 octets
    body = line * ((20 << 20) // len(line) + 1)
    msg = make_message("big@test", subject="20 MiB", body=body)
    assert len(msg) > 20 << 20
    with bridge_and_postfix(webhook_server, {"LMTP_BRIDGE_PAYLOAD": "raw"}) as (_b, postfix):
        postfix.sendmail(msg, SENDER, ["big@example.org"])
        postfix.wait_queue_empty(120)
        outcomes = postfix.outcomes()
    assert [o.status for o in outcomes] == ["sent"], outcomes
    (request,) = webhook_server.requests
    assert request.headers["content-type"].startswith("message/rfc822")
    received_body = request.body.split(b"\r\n\r\n", 1)[1]
    assert len(received_body) == len(body) + body.count(b"\n")  # LF -> CRLF on the wire
    expected = hashlib.sha256(body.replace(b"\n", b"\r\n")).hexdigest()
    assert hashlib.sha256(received_body).hexdigest() == expected


def test_postfix_reuses_connections_with_an_rset_probe_and_no_new_lhlo(
    webhook_server: WebhookServer,
) -> None:
    count = 8
    main_cf = {
        "lmtp_destination_concurrency_limit": "1",
        "debug_peer_list": "127.0.0.1",  # logs the LMTP dialogue
        "debug_peer_level": "2",
    }
    address = f"127.0.0.1:{free_port()}"
    with PrivatePostfix(transport_for(address), main_cf) as postfix:
        # no bridge yet: the messages pile up, deferred, for one destination
        for i in range(count):
            postfix.sendmail(make_message(f"reuse{i}@test"), SENDER, [f"r{i}@example.org"])
        wait_for(lambda: len(postfix.queue()) == count, 30, "all messages queued")
        with Bridge(webhook_server.url, listen=address) as bridge:
            bridge.wait_ready()
            postfix.flush()
            postfix.wait_queue_empty(60)
            sent = [o for o in postfix.outcomes() if o.status == "sent"]
            metrics = http_get(f"{bridge.metrics_url}/metrics")[1]
            log = postfix.log()

    assert len(sent) == count
    assert max(o.conn_use for o in sent) >= 2, [o.conn_use for o in sent]
    connections = metric_value(metrics, "lmtp_bridge_connections_total")
    messages = metric_value(metrics, "lmtp_bridge_messages_total")
    assert messages == count and connections < count, (connections, messages)
    port = address.rsplit(":", 1)[1]
    sent_lines = [line for line in log.splitlines() if f"> 127.0.0.1[127.0.0.1]:{port}: " in line]
    lhlo = [line for line in sent_lines if line.endswith(": LHLO pfx.test")]
    rset = [line for line in sent_lines if line.endswith(": RSET")]
    mail = [line for line in sent_lines if ": MAIL FROM:<" in line]
    assert len(mail) == count
    assert rset, "Postfix probes a cached connection with RSET"
    assert len(lhlo) == count - len(rset), (len(lhlo), len(rset))
    # the bridge agrees: one LMTP connection per LHLO (plus wait_ready()'s probe)
    assert connections == len(lhlo) + 1, (connections, len(lhlo))
    # every RSET probe was answered 250 (else Postfix would have dropped the connection)
    assert "< 127.0.0.1[127.0.0.1]:" + port + ": 250 2.0.0" in log


def test_sigterm_mid_batch_loses_nothing_and_bounces_nothing(
    webhook_server: WebhookServer,
) -> None:
    count = 30
    webhook_server.behave("*", delay=0.5)
    env = {"LMTP_BRIDGE_SHUTDOWN_GRACE": "10"}
    main_cf = {"lmtp_destination_concurrency_limit": "4"}  # most of the batch waits its turn
    with bridge_and_postfix(webhook_server, env, main_cf) as (bridge, postfix):
        for i in range(count):
            postfix.sendmail(
                make_message(f"term{i}@test", headers={"X-Hold": "yes"}),
                SENDER,
                [f"a{i}@example.org", f"b{i}@example.org"],
            )
        wait_for(lambda: len(postfix.queue()) == count, 30, "the batch to be queued (held)")
        postfix.release()
        wait_for(lambda: len(webhook_server.requests) >= 6, 30, "the batch to be under way")
        bridge.sigterm()
        assert bridge.wait(30) == 0, bridge.log
        taken = {r.rcpt for r in webhook_server.requests}  # posted before the bridge exited
        postfix.wait_outcomes(
            lambda found: any(o.status == "deferred" for o in found),
            30,
            "Postfix to defer what the stopped bridge did not take",
        )
        assert postfix.queue(), "the rest waits in Postfix's queue"
        with Bridge(webhook_server.url, listen=bridge.address) as again:
            again.wait_ready()
            postfix.flush()
            postfix.wait_queue_empty(120)
        outcomes = postfix.outcomes()

    statuses = final_status(outcomes)
    rcpts = {f"{p}{i}@example.org" for i in range(count) for p in "ab"}
    assert set(statuses) == rcpts
    assert all(s[-1] == "sent" and set(s[:-1]) <= {"deferred"} for s in statuses.values())
    assert not [o for o in outcomes if o.status not in ("sent", "deferred")]
    deferred = [o for o in outcomes if o.status == "deferred"]
    assert all(o.dsn.startswith("4.") for o in deferred), deferred
    # what the draining bridge had taken it finished within the grace: sent at the first try,
    # posted once; what it had not taken was never posted before the restart
    assert taken, "the SIGTERM came too late to test anything"
    for rcpt in taken:
        assert statuses[rcpt] == ["sent"], (rcpt, statuses[rcpt])
    for rcpt in rcpts:
        tries = webhook_server.requests_for(rcpt)
        assert len(tries) == 1, (rcpt, len(tries))
    reasons = Counter(re.sub(r"\[[\d.]+\]:\d+", "", o.text)[:70] for o in deferred)
    print(
        f"\nSIGTERM mid-batch: {count * 2} recipients, {len(taken)} taken before the bridge "
        f"exited, {len(deferred)} deferrals: {dict(reasons)}"
    )


# What real mailboxes use and Postfix forwards: the bridge must accept every one (a refusal
# here would bounce real mail). Postfix quotes local parts that are not dot-atoms itself.
ODD_ADDRESSES = {
    "o'brien@example.org": "o'brien@example.org",
    "bob+tag@example.org": "bob+tag@example.org",
    "!#$%&*=?^_`{|}~-@example.org": "!#$%&*=?^_`{|}~-@example.org",
    '"a b"@example.org': '"a b"@example.org',
    '"a@b"@example.org': '"a@b"@example.org',
    "a..b@example.org": '"a..b"@example.org',
    "trailing.@example.org": '"trailing."@example.org',
    "user@[192.0.2.1]": "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]": "user@[IPv6:2001:db8::1]",
    "jörg@example.org": "jörg@example.org",
    # a source route on sendmail's command line: Postfix makes it two recipients, one with an
    # empty quoted local part, and forwards both
    "@relay.example,@hop.example:routed@example.org": "routed@example.org",
}
FORWARDED = sorted([*ODD_ADDRESSES.values(), '""@relay.example'])


def test_odd_but_real_addresses_pass_through_postfix(webhook_server: WebhookServer) -> None:
    sender = '"odd sender"@example.org'
    with bridge_and_postfix(webhook_server) as (_bridge, postfix):
        postfix.sendmail(make_message("odd@test"), sender, list(ODD_ADDRESSES))
        postfix.wait_queue_empty(60)
        outcomes = postfix.outcomes()
    assert [o.status for o in outcomes] == ["sent"] * len(FORWARDED), postfix.log()
    got = sorted(envelope(r)["rcpt_to"] for r in webhook_server.requests)  # type: ignore[type-var]
    assert got == FORWARDED
    assert {envelope(r)["mail_from"] for r in webhook_server.requests} == {sender}


def test_poison_recipients_never_defer_healthy_ones_of_their_route(
    webhook_server: WebhookServer,
) -> None:
    """Issue 14's report: two recipients the webhook always answers 503 (three requests each
    with the default retries), retried by Postfix's queue, among healthy recipients of the same
    route. Every healthy recipient is sent on its first try; only the poison ones wait."""
    poison = ["p1@example.org", "p2@example.org"]
    for rcpt in poison:
        webhook_server.behave(rcpt, status=503, body="poison")
    healthy = [f"h{i}@example.org" for i in range(6)]
    with bridge_and_postfix(webhook_server) as (bridge, postfix):
        for i, rcpt in enumerate(healthy):
            postfix.sendmail(make_message(f"poison{i}@test"), SENDER, [*poison, rcpt])
            if i % 2:
                postfix.flush()  # Postfix retries the deferred poison recipients meanwhile
        postfix.wait_outcomes(done_with({r: ["sent"] for r in healthy}), 60, "the healthy")
        outcomes = postfix.outcomes()
        _, text = http_get(f"{bridge.metrics_url}/metrics")
    statuses = final_status(outcomes)
    assert all(statuses[rcpt] == ["sent"] for rcpt in healthy), statuses
    assert all(set(statuses[rcpt]) == {"deferred"} for rcpt in poison), statuses
    assert metric_value(text, "lmtp_bridge_circuit_breaker_opened_total", {"route": "default"}) == 0
    deferred_at_rcpt = {"result": "deferred", "route": "default", "stage": "rcpt"}
    assert metric_value(text, "lmtp_bridge_recipients_total", deferred_at_rcpt) == 0
