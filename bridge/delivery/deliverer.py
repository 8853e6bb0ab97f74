"""One finished transaction -> webhook calls, all at once -> replies.

One call per distinct recipient, or, for a route with ``delivery = "message"``, one call for all
of that route's recipients, answered with per-recipient verdicts (SPEC section 8). Replies go out
in RCPT order, each as soon as it and every reply before it are known.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from bridge.base.route import Route
from bridge.base.transaction import Envelope, MessageBuffer, Recipient
from bridge.delivery.breaker import Breakers, judge
from bridge.delivery.content import ContentWork, is_light
from bridge.lmtp.events import Reply
from bridge.mail.limits import DEFAULT_LIMITS, ParseLimits
from bridge.mail.logids import MAX_HEAD_SCAN, log_id, message_id_for_log
from bridge.mail.parsed import ParsedMessage
from bridge.ops import metrics
from bridge.ops.logs import log_event
from bridge.webhook.client import Outcome, WebhookClient, WebhookRequest, with_delivery_id
from bridge.webhook.payload import WebhookBody, build_body, build_message_body
from bridge.webhook.render import rendered
from bridge.webhook.signing import Signer, delivery_id
from bridge.webhook.verdicts import MALFORMED, VerdictError, read_verdicts

log = logging.getLogger("bridge.delivery.deliverer")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error in the bridge, try again later")
# RFC 5321 553: mailbox name not allowed. The same address always fails: a permanent refusal.
ADDRESS_STEERS_URL = Reply(
    553, "5.1.3", "Mailbox name not allowed: it would change the path of the webhook URL"
)
# RFC 3463 5.6.0: other or undefined media error (a route with on_parse_limit = "reject").
PARSE_LIMIT_REFUSED = "refused"  # "refused msg_...: past the parse limit max_mime_parts"


@dataclass(slots=True)
class Transaction:
    envelope: Envelope
    recipients: list[Recipient]
    message: MessageBuffer
    # parsed and rendered on the event loop (content.is_light), else in a worker thread
    light: bool = False
    # queue_id and message_id: in every log line of its deliveries, to find the message
    log_ids: dict[str, str | None] = field(default_factory=dict)


ReplySink = Callable[[Sequence[Reply]], Awaitable[None]]


class Deliverer:
    """Turns transactions into webhook calls through one shared, pooled client."""

    def __init__(
        self,
        client: WebhookClient,
        hostname: str,
        *,
        log_addresses: bool = False,
        breakers: Breakers | None = None,
        recipient_delimiter: str = "+",
        trusted_authserv_ids: Sequence[str] = (),
        max_verdicts_size: int = 1 << 20,
        parse_threads: int = 2,
        parse_limits: ParseLimits = DEFAULT_LIMITS,
    ):
        self._client = client
        self._hostname = hostname
        self._log_addresses = log_addresses
        self._signers: dict[tuple[str, ...], Signer] = {}
        self.breakers = breakers or Breakers()  # none unless given
        self._delimiter = recipient_delimiter
        self._trusted = tuple(trusted_authserv_ids)
        self._max_verdicts = max_verdicts_size
        self.content = ContentWork(parse_threads)
        self._limits = parse_limits

    def admit(self, route: Route) -> Reply | None:
        """At RCPT: None to accept a recipient of ``route``, or the reply that defers it
        (the route's circuit breaker is open)."""
        return self.breakers.admit(route.name)

    def release(self, route: Route) -> None:
        """At RCPT: a recipient ``admit`` accepted is refused after all (by verification)."""
        self.breakers.release(route.name)

    def refuse_address(self, route: Route, address: str) -> Reply | None:
        """At RCPT: the reply refusing ``address`` when it would steer the route's URL (an
        empty or dot path segment), else None."""
        why = route.steering_segment(address, self._delimiter)
        if why is None:
            return None
        # the session writes the outcome line; this says which segment (no address in it)
        log_event(log, logging.DEBUG, "address would steer the webhook URL",
                  route=route.name, why=why)  # fmt: skip
        return ADDRESS_STEERS_URL

    async def deliver(self, txn: Transaction, emit: ReplySink) -> None:
        """POST every recipient's copy concurrently; ``emit`` gets replies in RCPT order.

        A recipient given twice is posted once and answered twice. If the caller cancels
        (shutdown grace over), the replies not yet emitted are the caller's to send.
        """
        metrics.MESSAGES.inc()
        metrics.MESSAGE_SIZE.observe(txn.message.size)
        metrics.MESSAGE_RECIPIENTS.observe(len(txn.recipients))
        slots: dict[str, int] = {}
        unique: list[Recipient] = []
        order: list[int] = []  # RCPT position -> index of its distinct recipient
        for recipient in txn.recipients:
            if recipient.address not in slots:
                slots[recipient.address] = len(unique)
                unique.append(recipient)
            order.append(slots[recipient.address])
        txn.light = is_light(txn.message)
        ids = {
            "queue_id": log_id(txn.envelope.xforward.get("ident")),
            "message_id": message_id_for_log(txn.message.iter_chunks(MAX_HEAD_SCAN)),
        }
        txn.log_ids = {name: value for name, value in ids.items() if value is not None}
        parsed = await self._parse_if_needed(txn)
        try:
            requests = _requests(unique)
            if len(requests) == 1:  # one recipient, or one per-message route: no nursery
                replies = await self._deliver_request(txn, unique, parsed)  # all in one
                route_name = unique[0].route.name
                batch = [replies[i] for i in order]
                for reply in batch:
                    metrics.count_recipients(reply.code, route_name, "data")
                await emit(batch)
                return
            results: list[Reply | None] = [None] * len(unique)
            done = [trio.Event() for _ in unique]

            async def one(request: list[int]) -> None:
                try:
                    replies = await self._deliver_request(txn, [unique[i] for i in request], parsed)
                    for i, reply in zip(request, replies, strict=True):
                        results[i] = reply
                finally:
                    for i in request:
                        done[i].set()

            async with trio.open_nursery() as nursery:
                for request in requests:
                    nursery.start_soon(one, request)
                sent = 0
                while sent < len(order):
                    await done[order[sent]].wait()
                    batch = []
                    while sent < len(order) and done[order[sent]].is_set():
                        reply = results[order[sent]] or INTERNAL_ERROR
                        batch.append(reply)
                        route_name = unique[order[sent]].route.name
                        metrics.count_recipients(reply.code, route_name, "data")
                        sent += 1
                    await emit(batch)
        finally:
            if parsed is not None:
                parsed.close()  # its spooled text, if any

    async def _parse_if_needed(self, txn: Transaction) -> ParsedMessage | None:
        if all(r.route.payload == "raw" for r in txn.recipients):
            return None
        # Read from the buffer: a spooled message's text is decoded and escaped into a
        # temporary file, never held whole (ParsedMessage.from_buffer, then its rendering).
        return await self.content.run(txn.light, _parse, txn.message, self._trusted, self._limits)

    async def _deliver_request(
        self, txn: Transaction, recipients: list[Recipient], parsed: ParsedMessage | None
    ) -> list[Reply]:
        """The replies of one request: one recipient's, or a per-message route's recipients'."""
        route = recipients[0].route
        if parsed is not None and parsed.limits_hit and _refuses_past_limits(route):
            return [self._refuse(txn, r, parsed) for r in recipients]
        if route.delivery == "message":
            return await self._deliver_message(txn, recipients, parsed)
        return [await self._deliver_one(txn, recipients[0], parsed)]

    async def _deliver_message(
        self, txn: Transaction, recipients: list[Recipient], parsed: ParsedMessage | None
    ) -> list[Reply]:
        """One request for every recipient of one route; each gets its verdict (SPEC 8)."""
        route = recipients[0].route
        digest = txn.message.digest()
        addresses = [r.address for r in recipients]
        ids = [delivery_id(digest, address) for address in addresses]
        listing = "\n".join(addresses)  # the request's recipients, one key for id and breaker
        # Derived from the message and its recipient list: an MTA retry carries only the
        # recipients still due, so it is a new request, while each recipient keeps its id.
        request_id = ids[0] if len(ids) == 1 else delivery_id(digest, listing)
        started = time.monotonic()
        outcome: Outcome | None = None
        why = None
        try:
            request = await self.content.run(
                txn.light, self._message_request, txn, recipients, ids, parsed, request_id
            )
            # The reply text names each recipient's own id (below), not the request's.
            request = replace(
                request,
                answer_limit=self._max_verdicts,
                delivery_id="",
                log_fields={"request_id": request_id, **txn.log_ids},
            )
            outcome = await self._client.deliver(route, request)
            self._record(route, outcome, listing)
            replies = [outcome.reply] * len(recipients)
            if outcome.reply.is_success:
                try:
                    replies = read_verdicts(
                        outcome.answer,
                        outcome.answer_truncated,
                        addresses,
                        outcome.reply,
                        route.status_map,
                    )
                except VerdictError as exc:
                    why = str(exc)
                    replies = [MALFORMED] * len(recipients)
        except Exception:
            log.exception(
                "delivery failed inside the bridge",
                extra={"fields": {"request_id": request_id, **txn.log_ids}},
            )
            replies = [INTERNAL_ERROR] * len(recipients)
        if why is not None:
            log_event(
                log,
                logging.WARNING,
                "malformed verdicts",
                request_id=request_id,
                route=route.name,
                why=why,
            )
        replies = [with_delivery_id(r, rid) for r, rid in zip(replies, ids, strict=True)]
        for recipient, rid, reply in zip(recipients, ids, replies, strict=True):
            self._log_outcome(txn, recipient, rid, reply, outcome, started, request_id)
        return replies

    def _refuse(self, txn: Transaction, recipient: Recipient, parsed: ParsedMessage) -> Reply:
        """554 5.6.0 for a recipient whose route rejects messages past a parse limit."""
        did = delivery_id(txn.message.digest(), recipient.address)
        names = ", ".join(parsed.limits_hit)
        reply = Reply(554, "5.6.0", f"{PARSE_LIMIT_REFUSED} {did}: past the parse limit {names}")
        log_event(
            log,
            logging.WARNING,
            "recipient rejected",
            delivery_id=did,
            route=recipient.route.name,
            error="parse_limit",
            limits=list(parsed.limits_hit),
            reply=str(reply),
        )
        return reply

    async def _deliver_one(
        self, txn: Transaction, recipient: Recipient, parsed: ParsedMessage | None
    ) -> Reply:
        route = recipient.route
        did = delivery_id(txn.message.digest(), recipient.address)
        started = time.monotonic()
        outcome: Outcome | None = None
        try:
            request = await self.content.run(txn.light, self._request, txn, recipient, parsed, did)
            request = replace(request, log_fields={"delivery_id": did, **txn.log_ids})
            outcome = await self._client.deliver(route, request)
            reply = outcome.reply
            self._record(route, outcome, recipient.address)
        except Exception:
            log.exception(
                "delivery failed inside the bridge",
                extra={"fields": {"delivery_id": did, **txn.log_ids}},
            )
            reply = INTERNAL_ERROR
        self._log_outcome(txn, recipient, did, reply, outcome, started)
        return reply

    def _record(self, route: Route, outcome: Outcome, recipients: str) -> None:
        """Tell the route's breaker what one request's outcome says about the endpoint: once,
        however many tries; a 5xx/429 once per distinct ``recipients`` (the request's)."""
        self.breakers.record(route.name, judge(outcome.http_status, outcome.error, recipients))

    def _log_outcome(
        self,
        txn: Transaction,
        recipient: Recipient,
        did: str,
        reply: Reply,
        outcome: Outcome | None,
        started: float,
        request_id: str | None = None,
    ) -> None:
        """One line per recipient outcome (built only when it is written)."""
        route = recipient.route
        level = logging.INFO if reply.is_success else logging.WARNING
        if not log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "delivery_id": did,
            **({"request_id": request_id} if request_id else {}),
            **txn.log_ids,
            "route": route.name,
            "http_status": outcome.http_status if outcome else None,
            "attempts": outcome.attempts if outcome else 0,
            "error": outcome.error if outcome else "internal",
            "reply": str(reply),
            "duration": round(time.monotonic() - started, 4),
        }
        if outcome is not None and outcome.detail:
            fields["detail"] = outcome.detail
        if self._log_addresses or log.isEnabledFor(logging.DEBUG):
            fields["mail_from"] = txn.envelope.mail_from
            fields["rcpt_to"] = recipient.address
        log_event(log, level, f"recipient {metrics.result_of(reply.code)}", **fields)

    def _request(
        self, txn: Transaction, recipient: Recipient, parsed: ParsedMessage | None, did: str
    ) -> WebhookRequest:
        """One recipient's request, body and signature made: in a worker thread unless the
        message is light (a big body is read, and hashed, from its spool file)."""
        route = recipient.route
        body = build_body(
            route.payload,
            txn.envelope,
            recipient,
            txn.message,
            parsed,
            did,
            self._hostname,
            include_raw=route.include_raw,
            trace_headers=route.trace_headers,
            delimiter=self._delimiter,
        )
        return self._signed(
            txn, route, route.url_for(recipient.address, self._delimiter), body, did
        )

    def _message_request(
        self,
        txn: Transaction,
        recipients: list[Recipient],
        ids: list[str],
        parsed: ParsedMessage | None,
        request_id: str,
    ) -> WebhookRequest:
        """The one request of a per-message route (as ``_request``, for all its recipients)."""
        route = recipients[0].route
        body = build_message_body(
            route.payload,
            txn.envelope,
            list(zip(recipients, ids, strict=True)),
            txn.message,
            parsed,
            request_id,
            self._hostname,
            include_raw=route.include_raw,
            trace_headers=route.trace_headers,
            delimiter=self._delimiter,
        )
        return self._signed(txn, route, route.url, body, request_id)

    def _signed(
        self, txn: Transaction, route: Route, url: str, body: WebhookBody, did: str
    ) -> WebhookRequest:
        """The request for ``body``: the id headers, the signature, the route's headers."""
        headers = [
            ("Content-Type", body.content_type),
            *body.headers,
            ("Idempotency-Key", did),
            ("X-Lmtp-Bridge-Delivery-Id", did),
        ]
        signer = self._signer(route)
        if signer is None:
            headers.append(("webhook-id", did))
        else:
            headers += signer.headers(did, body.chunks())
        headers += route.headers.items()
        return WebhookRequest(
            url=url,
            headers=headers,
            chunks=body.chunks,
            length=body.length,
            in_memory=not txn.message.spooled,  # no spool file: nothing to read from disk
            delivery_id=did,
        )

    def _signer(self, route: Route) -> Signer | None:
        if not route.secrets:
            return None
        signer = self._signers.get(route.secrets)
        if signer is None:
            signer = self._signers[route.secrets] = Signer(route.secrets)
        return signer


def _parse(
    message: MessageBuffer, trusted: tuple[str, ...], limits: ParseLimits = DEFAULT_LIMITS
) -> ParsedMessage:
    """The message parsed, and rendered once for every recipient's body (json and multipart
    share it): both the heavy part of a big message, done together off the event loop."""
    parsed = ParsedMessage.from_buffer(message, trusted, limits)
    try:
        rendered(parsed)
    except Exception:  # build_body meets it again for each recipient, which answers 451
        log.debug("rendering the message failed", exc_info=True)
    return parsed


def _requests(recipients: list[Recipient]) -> list[list[int]]:
    """The requests for distinct recipients, as lists of their indices: one per recipient, and
    one per per-message route (its recipients in RCPT order)."""
    requests: list[list[int]] = []
    by_route: dict[str, list[int]] = {}
    for i, recipient in enumerate(recipients):
        route = recipient.route
        if route.delivery != "message":
            requests.append([i])
        elif route.name in by_route:
            by_route[route.name].append(i)
        else:
            requests.append(by_route.setdefault(route.name, [i]))
    return requests


def _refuses_past_limits(route: Route) -> bool:
    """The route rejects a message past a parse limit; a raw payload does not use the parse,
    so its route never refuses for it."""
    return route.on_parse_limit == "reject" and route.payload != "raw"
