"""Per-recipient verdicts in a per-message webhook's 2xx answer (SPEC section 8).

A 2xx answer applies to every recipient unless its body is JSON of the shape
``{"recipients": {"<address>": V}}``: V is an HTTP-like status (``404``, mapped by section 4 with
the route's overrides) or an LMTP reply string (``"550 5.1.1 no such user"``, checked like
``X-Lmtp-Reply``). Recipients the map leaves out get the 2xx's own reply. Anything that looks like
an attempt at verdicts but is not exactly right defers every recipient: never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from bridge.base.route import join_address, split_address
from bridge.lmtp.events import Reply
from bridge.webhook.client import map_response, parse_reply

MALFORMED = Reply(451, "4.3.0", "webhook answered malformed per-recipient verdicts")


class VerdictError(ValueError):
    """The answer tried to give verdicts and got them wrong; the message says how."""


def address_key(address: str) -> str:
    """An address as the verdict map compares it: the domain lower-cased, the local part exact
    (as routes match)."""
    return join_address(*split_address(address))


def read_verdicts(
    body: bytes,
    truncated: bool,
    recipients: Sequence[str],
    success: Reply,
    overrides: Mapping[str, str],
) -> list[Reply]:
    """One reply per address of ``recipients`` for a 2xx answer with ``body``.

    ``success`` is the reply the 2xx itself maps to; ``truncated`` says the body was longer than
    what was read. Raises VerdictError for a malformed verdicts body.
    """
    text = body.lstrip(b" \t\r\n")
    if not text.startswith(b"{"):
        return [success] * len(recipients)  # no JSON object: the status speaks for everyone
    if truncated:
        raise VerdictError("the JSON answer is longer than max_verdicts_size")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise VerdictError(f"the answer is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or "recipients" not in document:
        return [success] * len(recipients)
    verdicts = document["recipients"]
    if not isinstance(verdicts, dict):
        raise VerdictError('"recipients" is not an object of address -> verdict')
    wanted = {address_key(address) for address in recipients}
    chosen: dict[str, Reply] = {}
    for address, value in verdicts.items():
        key = address_key(address)
        if key not in wanted:
            raise VerdictError(f"a verdict for {address!r}, not a recipient of this request")
        if key in chosen:
            raise VerdictError(f"two verdicts for {address!r}")
        chosen[key] = verdict_reply(value, overrides)
    return [chosen.get(address_key(address), success) for address in recipients]


def verdict_reply(value: object, overrides: Mapping[str, str]) -> Reply:
    """The reply for one verdict: an HTTP-like status or an LMTP reply string."""
    if isinstance(value, int) and not isinstance(value, bool):
        status = value
    elif isinstance(value, str) and len(value) == 3 and value.isascii() and value.isdigit():
        status = int(value)
    elif isinstance(value, str):
        reply = parse_reply(value)
        if reply is None:
            raise VerdictError(f"{value[:80]!r} is not an LMTP reply such as '550 5.1.1 text'")
        return reply if reply.text else Reply(reply.code, reply.status, "webhook verdict")
    else:
        raise VerdictError(f"a verdict must be a status or a reply string, not {value!r:.80}")
    if not 200 <= status <= 599:
        raise VerdictError(f"verdict status {status} is not between 200 and 599")
    reply = map_response(status, "", None, overrides)
    generic = ("webhook answered HTTP", "delivered (HTTP")
    if isinstance(reply.text, str) and reply.text.startswith(generic):
        return Reply(reply.code, reply.status, f"webhook verdict {status}")
    return reply
