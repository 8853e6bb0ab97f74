"""One finished transaction -> one webhook call per distinct recipient, all at once -> replies.

Replies go out in RCPT order, each as soon as it and every reply before it are known.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from bridge.base.route import Route
from bridge.base.transaction import Envelope, MessageBuffer, Recipient
from bridge.delivery.breaker import Breakers
from bridge.lmtp.events import Reply
from bridge.mail.parsed import ParsedMessage
from bridge.ops import metrics
from bridge.ops.logs import log_event
from bridge.webhook.client import Outcome, WebhookClient, WebhookRequest
from bridge.webhook.payload import build_body
from bridge.webhook.render import rendered
from bridge.webhook.signing import Signer, delivery_id

log = logging.getLogger("bridge.delivery.deliverer")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error in the bridge, try again later")
PARSE_IN_THREAD_ABOVE = 1 << 20  # bytes; bigger MIME parses leave the event loop free


@dataclass(slots=True)
class Transaction:
    envelope: Envelope
    recipients: list[Recipient]
    message: MessageBuffer


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
    ):
        self._client = client
        self._hostname = hostname
        self._log_addresses = log_addresses
        self._signers: dict[tuple[str, ...], Signer] = {}
        self.breakers = breakers or Breakers(threshold=0, cooldown=1.0)
        self._delimiter = recipient_delimiter
        self._trusted = tuple(trusted_authserv_ids)

    def admit(self, route: Route) -> Reply | None:
        """At RCPT: None to accept a recipient of ``route``, or the reply that defers it
        (the route's circuit breaker is open)."""
        return self.breakers.admit(route.name)

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
        parsed = await self._parse_if_needed(txn)
        try:
            if len(unique) == 1:  # the common case: no nursery, no events, one task fewer
                reply = await self._deliver_one(txn, unique[0], parsed)
                metrics.count_recipients(reply.code, unique[0].route.name, "data", len(order))
                await emit([reply] * len(order))
                return
            results: list[Reply | None] = [None] * len(unique)
            done = [trio.Event() for _ in unique]

            async def one(i: int) -> None:
                try:
                    results[i] = await self._deliver_one(txn, unique[i], parsed)
                finally:
                    done[i].set()

            async with trio.open_nursery() as nursery:
                for i in range(len(unique)):
                    nursery.start_soon(one, i)
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
        message = txn.message
        if message.size > PARSE_IN_THREAD_ABOVE:
            return await trio.to_thread.run_sync(_parse, message, self._trusted)
        return _parse(message, self._trusted)

    async def _deliver_one(
        self, txn: Transaction, recipient: Recipient, parsed: ParsedMessage | None
    ) -> Reply:
        route = recipient.route
        did = delivery_id(txn.message.digest(), recipient.address)
        started = time.monotonic()
        outcome: Outcome | None = None
        try:
            request = await self._request(txn, recipient, parsed, did)
            outcome = await self._client.deliver(route, request)
            reply = outcome.reply
            if outcome.error != "internal":  # our own bugs say nothing about the webhook
                failed = outcome.reply.is_transient
                self.breakers.get(route.name).record(
                    success=not failed, failures=outcome.attempts if failed else 0
                )
        except Exception:
            log.exception(
                "delivery failed inside the bridge", extra={"fields": {"delivery_id": did}}
            )
            reply = INTERNAL_ERROR
        level = logging.INFO if reply.is_success else logging.WARNING
        if not log.isEnabledFor(level):  # one line per recipient: built only when written
            return reply
        fields: dict[str, Any] = {
            "delivery_id": did,
            "route": route.name,
            "http_status": outcome.http_status if outcome else None,
            "attempts": outcome.attempts if outcome else 0,
            "error": outcome.error if outcome else "internal",
            "reply": str(reply),
            "duration": round(time.monotonic() - started, 4),
        }
        if self._log_addresses or log.isEnabledFor(logging.DEBUG):
            fields["mail_from"] = txn.envelope.mail_from
            fields["rcpt_to"] = recipient.address
        log_event(log, level, f"recipient {metrics.result_of(reply.code)}", **fields)
        return reply

    async def _request(
        self, txn: Transaction, recipient: Recipient, parsed: ParsedMessage | None, did: str
    ) -> WebhookRequest:
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
        headers = [
            ("Content-Type", body.content_type),
            *body.headers,
            ("Idempotency-Key", did),
            ("X-Lmtp-Bridge-Delivery-Id", did),
        ]
        signer = self._signer(route)
        if signer is None:
            headers.append(("webhook-id", did))
        elif txn.message.spooled:  # reading and hashing a big body: off the event loop
            headers += await trio.to_thread.run_sync(signer.headers, did, body.chunks())
        else:
            headers += signer.headers(did, body.chunks())
        headers += route.headers.items()
        return WebhookRequest(
            url=route.url_for(recipient.address, self._delimiter),
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


def _parse(message: MessageBuffer, trusted: tuple[str, ...]) -> ParsedMessage:
    """The message parsed, and rendered once for every recipient's body (json and multipart
    share it): both the heavy part of a big message, done together off the event loop."""
    parsed = ParsedMessage.from_buffer(message, trusted)
    try:
        rendered(parsed)
    except Exception:  # build_body meets it again for each recipient, which answers 451
        log.debug("rendering the message failed", exc_info=True)
    return parsed

