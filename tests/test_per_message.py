"""Per-message delivery (SPEC section 8): one request per message and route, a verdict per
recipient. The verdict parser alone, then the running bridge with real clients (swaks,
smtp-source, a raw LMTP session, Postfix) against a real receiver that answers verdicts."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from bridge_process import (
    StartBridge,
    data_section,
    message,
    metric_value,
    metrics_text,
    open_session,
    tool,
)
from hypothesis import given
from hypothesis import strategies as st
from test_e2e_clients import run_client, swaks_data_replies
from webhook_server import RecordedRequest, Step, WebhookServer

from bridge.app import Running
from bridge.config import ConfigError, load_settings
from bridge.lmtp.events import Reply
from bridge.webhook.verdicts import VerdictError, read_verdicts, verdict_reply

OK = Reply(250, "2.0.0", "delivered (HTTP 200)")
RCPTS = ["a@example.org", "b@Example.ORG", "c+tag@example.org"]


def verdicts(body: object, truncated: bool = False, rcpts: list[str] = RCPTS) -> list[str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return [str(r) for r in read_verdicts(raw, truncated, rcpts, OK, {})]


# ---- the verdict parser -------------------------------------------------------------------


def test_no_verdicts_means_the_status_speaks_for_everyone() -> None:
    assert verdicts(b"") == [str(OK)] * 3
    assert verdicts(b"accepted") == [str(OK)] * 3
    assert verdicts({"status": "queued"}) == [str(OK)] * 3
    assert verdicts([1, 2]) == [str(OK)] * 3


def test_statuses_and_reply_strings_map_per_recipient_in_rcpt_order() -> None:
    got = verdicts(
        {"recipients": {"b@example.org": 404, "a@example.org": "451 4.2.1 mailbox busy"}}
    )
    assert got == ["451 4.2.1 mailbox busy", "550 5.1.1 webhook verdict 404", str(OK)]


@pytest.mark.parametrize(
    ("verdict", "reply"),
    [
        (200, "250 2.0.0 webhook verdict 200"),
        ("404", "550 5.1.1 webhook verdict 404"),
        (410, "550 5.1.1 webhook verdict 410"),
        (413, "552 5.3.4 webhook verdict 413"),
        (422, "554 5.6.0 webhook verdict 422"),
        (403, "451 4.7.0 webhook verdict 403"),
        (429, "451 4.3.0 webhook verdict 429"),
        (503, "451 4.3.0 webhook verdict 503"),
        (507, "452 4.2.2 webhook verdict 507"),
        ("552 5.2.2 over quota", "552 5.2.2 over quota"),
        ("250 2.1.5", "250 2.1.5 webhook verdict"),
    ],
)
def test_each_verdict_maps_like_section_4(verdict: object, reply: str) -> None:
    assert str(verdict_reply(verdict, {})) == reply


def test_the_routes_status_map_applies_to_verdict_statuses() -> None:
    assert str(verdict_reply(404, {"404": "451 4.1.1 look again later"})).startswith("451 4.1.1")


@pytest.mark.parametrize(
    "body",
    [
        {"recipients": ["a@example.org"]},
        {"recipients": {"a@example.org": 99}},
        {"recipients": {"a@example.org": 600}},
        {"recipients": {"a@example.org": True}},
        {"recipients": {"a@example.org": None}},
        {"recipients": {"a@example.org": "550 4.1.1 class mismatch"}},
        {"recipients": {"a@example.org": "421 4.3.2 closing"}},
        {"recipients": {"a@example.org": "2.0.0 250"}},
        {"recipients": {"stranger@example.org": 404}},
        {"recipients": {"a@example.org": 404, "a@EXAMPLE.org": 200}},
        b'{"recipients": {"a@example.org": 404',
        b"{not json",
    ],
)
def test_a_malformed_verdicts_body_is_refused_not_guessed(body: object) -> None:
    with pytest.raises(VerdictError):
        verdicts(body)


def test_a_json_answer_cut_at_the_limit_is_refused() -> None:
    with pytest.raises(VerdictError, match="max_verdicts_size"):
        verdicts({"recipients": {}}, truncated=True)


def test_local_parts_compare_exactly_domains_without_case() -> None:
    with pytest.raises(VerdictError):  # A@ is another mailbox than a@
        verdicts({"recipients": {"A@example.org": 404}})
    assert verdicts({"recipients": {"b@EXAMPLE.org": 404}})[1].startswith("550")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=12,
)
ADDRESSES = st.sampled_from([*RCPTS, "A@example.org", "x@y"]) | st.text(max_size=10)
VERDICT_MAPS = st.dictionaries(ADDRESSES, JSON_VALUES | st.integers(100, 700), max_size=5)


@given(
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps({"recipients": v}).encode())
    | VERDICT_MAPS.map(lambda v: json.dumps({"recipients": v}).encode())
)
def test_any_answer_gives_one_valid_reply_per_recipient_or_a_clean_refusal(body: bytes) -> None:
    try:
        replies = read_verdicts(body, False, RCPTS, OK, {})
    except VerdictError:
        return
    assert len(replies) == len(RCPTS)
    for reply in replies:
        assert reply.code in range(200, 600) and reply.code != 421
        assert reply.status[0] == str(reply.code)[0]
        line = str(reply)
        assert "\r" not in line and "\n" not in line and len(line) <= 510


# ---- settings -----------------------------------------------------------------------------


def test_delivery_is_a_route_setting_and_an_env_var_for_the_default_route() -> None:
    env = {"LMTP_BRIDGE_WEBHOOK_URL": "http://127.0.0.1:1/hook", "LMTP_BRIDGE_DELIVERY": "Message"}
    assert load_settings(environ=env).delivery == "message"
    with pytest.raises(ConfigError, match="delivery"):
        load_settings(environ={**env, "LMTP_BRIDGE_DELIVERY": "batch"})


def test_a_per_message_url_cannot_hold_recipient_placeholders() -> None:
    env = {
        "LMTP_BRIDGE_WEBHOOK_URL": "http://127.0.0.1:1/u/{local}",
        "LMTP_BRIDGE_DELIVERY": "message",
    }
    with pytest.raises(ConfigError, match=r"webhook_url: recipient placeholders"):
        load_settings(environ=env)


# ---- the running bridge -------------------------------------------------------------------


def status_of(address: str) -> int | None:
    match = re.match(r"status-(\d{3})@", address)
    return int(match.group(1)) if match else None


async def counted(running: Running, name: str, **labels: str) -> float:
    """A counter's value now (the registry is shared by every bridge of this test process)."""
    return metric_value(await metrics_text(running), name, labels)


def envelope_of(request: RecordedRequest) -> dict[str, Any]:
    """The envelope object of a json or multipart request."""
    if not request.headers["content-type"].startswith("multipart/"):
        return request.json()["envelope"]  # type: ignore[no-any-return]
    first_part = request.body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    return json.loads(first_part)  # type: ignore[no-any-return]


def verdict_responder(
    extra: Callable[[RecordedRequest], Step | None] = lambda request: None,
) -> Callable[[RecordedRequest], Step]:
    """Answers 200 with a verdict for every ``status-NNN@`` recipient (like the demo)."""

    def respond(request: RecordedRequest) -> Step:
        chosen = extra(request)
        if chosen is not None:
            return chosen
        if request.headers.get("content-type", "").startswith("message/rfc822"):
            addresses = [
                urllib.parse.unquote(v.strip())
                for v in request.headers["x-lmtp-rcpt-to"].split(",")
            ]
        else:
            addresses = [r["address"] for r in envelope_of(request)["recipients"]]
        answer = {a: status_of(a) for a in addresses if status_of(a)}
        return Step(200, json.dumps({"recipients": answer}), {"Content-Type": "application/json"})

    return respond


async def send(running: Running, rcpts: list[str], data: bytes | None = None) -> list[str]:
    """One transaction over a raw LMTP session: the replies after the final dot, as text."""
    session = await open_session(running)
    assert (await session.command("MAIL FROM:<alice@example.org>")).code == 250
    for rcpt in rcpts:
        assert (await session.command(f"RCPT TO:<{rcpt}>")).code == 250
    assert (await session.command("DATA")).code == 354
    await session.send(data_section(data or message()))
    replies = [await session.reply() for _ in rcpts]
    await session.command("QUIT")
    await session.aclose()
    return [str(r) for r in replies]


@pytest.mark.parametrize("payload", ["json", "raw", "multipart"])
async def test_one_request_per_message_with_a_verdict_per_recipient(
    payload: str, start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    webhook_server.responder = verdict_responder()
    running = await start_bridge(delivery="message", payload=payload)
    rcpts = [
        "ok@example.org",
        "status-404@example.org",
        "status-503@example.org",
        "two@Example.org",
    ]

    replies = await send(running, rcpts)

    assert [r[:9] for r in replies] == ["250 2.0.0", "550 5.1.1", "451 4.3.0", "250 2.0.0"]
    (request,) = webhook_server.requests
    if payload == "raw":
        assert request.headers["x-lmtp-rcpt-to"] == ", ".join(rcpts)  # one header each, in order
        assert b"Delivered-To:" not in request.body.split(b"\r\n\r\n")[0]
        return
    envelope = envelope_of(request)
    assert "rcpt_to" not in envelope and "orcpt" not in envelope
    listed = envelope["recipients"]
    assert [r["address"] for r in listed] == rcpts
    assert listed[3] | {"id": None} == {
        "address": "two@Example.org", "orcpt": None, "local": "two", "domain": "example.org",
        "user": "two", "tag": None, "id": None,
    }  # fmt: skip
    # each recipient's id is the one it would have in recipient mode
    digest = request.headers["webhook-id"]
    assert len({r["id"] for r in listed}) == 4 and digest not in {r["id"] for r in listed}


async def test_recipient_ids_are_those_of_recipient_mode_and_stable_across_retries(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    webhook_server.responder = verdict_responder()
    data = message()
    per_message = await start_bridge(delivery="message")
    await send(per_message, ["x@example.org", "y@example.org"], data)
    await send(per_message, ["y@example.org"], data)  # the MTA retrying only y
    first, retry = webhook_server.requests
    ids = {r["address"]: r["id"] for r in first.json()["envelope"]["recipients"]}
    assert retry.json()["envelope"]["recipients"][0]["id"] == ids["y@example.org"]
    assert first.headers["webhook-id"] != retry.headers["webhook-id"]

    webhook_server.responder = None
    per_recipient = await start_bridge()
    await send(per_recipient, ["x@example.org"], data)
    assert webhook_server.requests[-1].headers["webhook-id"] == ids["x@example.org"]


async def test_a_failed_request_answers_everyone_and_is_retried_whole(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    answers = iter([Step(503, "busy"), Step(200, '{"recipients": {"b@example.org": 410}}')])
    webhook_server.responder = lambda request: next(answers)
    running = await start_bridge(delivery="message", http_retries=1)

    replies = await send(running, ["a@example.org", "b@example.org"])

    assert [r[:9] for r in replies] == ["250 2.0.0", "550 5.1.1"]
    first, second = webhook_server.requests
    assert first.body == second.body and first.headers["webhook-id"] == second.headers["webhook-id"]


async def test_non_2xx_and_malformed_verdicts_apply_to_every_recipient(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    running = await start_bridge(delivery="message", http_retries=0)
    ok_before = await counted(
        running, "lmtp_bridge_webhook_requests_total", route="default", status_class="2xx"
    )
    webhook_server.responder = lambda request: Step(404, "no such list")
    assert [r[:9] for r in await send(running, ["a@example.org", "b@example.org"])] == [
        "550 5.1.1"
    ] * 2
    webhook_server.responder = lambda request: Step(200, '{"recipients": {"z@example.org": 200}}')
    replies = await send(running, ["a@example.org", "b@example.org"])
    malformed = "451 4.3.0 webhook answered malformed per-recipient verdicts (msg_"
    assert [r.startswith(malformed) for r in replies] == [True, True]
    assert replies[0] != replies[1]  # each names its own delivery id
    ok = await counted(
        running, "lmtp_bridge_webhook_requests_total", route="default", status_class="2xx"
    )
    assert ok - ok_before == 1  # one request for two recipients


async def test_routes_of_both_kinds_keep_rcpt_order(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    webhook_server.responder = verdict_responder(
        lambda r: None if "recipients" in r.body.decode() else Step(200, "ok")
    )
    routes = [
        {"name": "lists", "match": "@lists.example.org", "delivery": "message"},
        {"name": "people", "match": "@example.org"},
    ]
    for route in routes:
        route["url"] = webhook_server.url
    running = await start_bridge(routes=routes)
    labels = [{"result": "delivered", "route": r, "stage": "data"} for r in ("lists", "people")]
    before = sum([await counted(running, "lmtp_bridge_recipients_total", **lb) for lb in labels])
    rcpts = [
        "p1@example.org", "status-410@lists.example.org", "p2@example.org",
        "dev@lists.example.org", "p1@example.org",
    ]  # fmt: skip

    replies = await send(running, rcpts)

    assert [r[:3] for r in replies] == ["250", "550", "250", "250", "250"]
    bodies = [r.json()["envelope"] for r in webhook_server.requests]
    lists = [b for b in bodies if "recipients" in b]
    assert len(bodies) == 3 and len(lists) == 1  # p1 twice in the transaction: posted once
    assert [r["address"] for r in lists[0]["recipients"]] == rcpts[1:4:2]
    after = sum([await counted(running, "lmtp_bridge_recipients_total", **lb) for lb in labels])
    assert after - before == 4


@pytest.mark.peer
async def test_swaks_and_smtp_source_with_many_recipients(
    start_bridge: StartBridge, webhook_server: WebhookServer
) -> None:
    webhook_server.responder = verdict_responder()
    running = await start_bridge(delivery="message")
    address = running.lmtp_addresses[0]
    delivered = {"result": "delivered", "route": "default", "stage": "data"}
    before = await counted(running, "lmtp_bridge_recipients_total", **delivered)
    rcpts = ["r1@example.org", "status-404@example.org", "r3@example.org"]
    swaks = [tool("swaks"), "--protocol", "LMTP", "--server", address, "--pipeline"]
    _, transcript = await run_client([*swaks, "--to", ",".join(rcpts)])
    assert [r[:3] for r in swaks_data_replies(transcript)] == ["250", "550", "250"]
    assert len(webhook_server.requests) == 1

    # smtp-source: 20 messages of 25 recipients each, 5 sessions, every reply read (-L LMTP)
    host, port = address.rsplit(":", 1)
    code, out = await run_client(
        [tool("smtp-source"), "-L", "-s", "5", "-m", "20", "-r", "25", "-l", "2048",
         "-f", "from@example.org", "-t", "to@example.org", f"inet:{host}:{port}"]
    )  # fmt: skip
    assert code == 0, out
    assert len(webhook_server.requests) == 21  # smtp-source waited for every reply
    after = await counted(running, "lmtp_bridge_recipients_total", **delivered)
    assert after - before == 2 + 500
    assert all(len(r.json()["envelope"]["recipients"]) == 25 for r in webhook_server.requests[1:])


@pytest.mark.peer
def test_postfix_splits_by_its_recipient_limit_and_logs_each_verdict(
    webhook_server: WebhookServer,
) -> None:
    """A real Postfix queue: with lmtp_destination_recipient_limit = 2 it sends five recipients
    as three LMTP transactions (three requests); each recipient ends as its verdict says, and the
    one deferred is retried alone, keeping its id."""
    from postfix_harness import final_status, make_message
    from test_postfix import bridge_and_postfix, done_with

    asked: list[str] = []

    def busy_once(request: RecordedRequest) -> Step | None:
        addresses = [r["address"] for r in envelope_of(request)["recipients"]]
        asked.extend(addresses)
        if "full@example.org" in addresses and asked.count("full@example.org") == 1:
            body = {"recipients": {"full@example.org": "452 4.2.2 mailbox full"}}
            return Step(200, json.dumps(body), {"Content-Type": "application/json"})
        return None

    webhook_server.responder = verdict_responder(busy_once)
    rcpts = [f"{name}@example.org" for name in ("a", "status-404", "full", "b", "c")]
    env = {"LMTP_BRIDGE_DELIVERY": "message"}
    main_cf = {"lmtp_destination_recipient_limit": "2"}
    with bridge_and_postfix(webhook_server, env, main_cf) as (_bridge, postfix):
        postfix.sendmail(make_message("per-message@test"), "sender@example.org", rcpts)
        expected = {
            "a@example.org": ["sent"],
            "status-404@example.org": ["bounced"],
            "full@example.org": ["deferred", "sent"],
            "b@example.org": ["sent"],
            "c@example.org": ["sent"],
        }
        postfix.wait_outcomes(done_with(expected), 60, "every recipient's outcome")
        outcomes = postfix.outcomes()

    assert {r: s for r, s in final_status(outcomes).items() if r in expected} == expected
    by_rcpt = {(o.rcpt, o.status): o for o in outcomes}
    assert by_rcpt["full@example.org", "deferred"].dsn == "4.2.2"
    assert by_rcpt["status-404@example.org", "bounced"].dsn == "5.1.1"
    sent_text = by_rcpt["a@example.org", "sent"].text
    requests = [
        r for r in webhook_server.requests if r.headers["content-type"] == "application/json"
    ]
    lists = [[x["address"] for x in envelope_of(r)["recipients"]] for r in requests]
    deliveries = [x for x in lists if "sender@example.org" not in x]  # not the bounce notice
    assert sorted(len(x) for x in deliveries[:3]) == [1, 2, 2]
    assert deliveries[3] == ["full@example.org"]  # the retry: only the recipient still due
    full_ids = {
        x["id"]
        for r in requests
        for x in envelope_of(r)["recipients"]
        if x["address"] == "full@example.org"
    }
    assert len(full_ids) == 1  # the retried recipient keeps its id, though the request's changed
    a_id = next(
        x["id"]
        for r in requests
        for x in envelope_of(r)["recipients"]
        if x["address"] == "a@example.org"
    )
    assert a_id in sent_text  # Postfix's log line names the recipient's own id
