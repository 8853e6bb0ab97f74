"""Delivery ids and Standard Webhooks signatures for the webhook requests.

Signing streams over the body, so a spooled message is never joined in memory to be signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
# Standard Webhooks asks for 24 to 64 random bytes; shorter keys are refused, longer ones allowed.
MIN_SECRET_BYTES = 24
_ID_PREFIX = "msg_"
_ID_DOMAIN = b"lmtp-bridge delivery-id v1\x00"


def delivery_id(message_digest: bytes, recipient: str) -> str:
    """The id of one recipient's copy: stable across MTA retries, distinct per recipient.

    ``message_digest`` is the SHA-256 of the message bytes as received. The recipient is
    compared exactly as given: nothing is lowercased.
    """
    h = hashlib.sha256(_ID_DOMAIN)
    # The digest has a fixed length, so digest + recipient cannot collide with another pair.
    h.update(message_digest)
    h.update(recipient.encode("utf-8", "surrogatepass"))
    # 20 bytes = 160 bits = exactly 32 base32 characters (RFC 4648, lower case), no padding.
    bits = int.from_bytes(h.digest()[:20], "big")
    return _ID_PREFIX + "".join([_B32_PAIRS[(bits >> shift) & 1023] for shift in _B32_SHIFTS])


# base32 ten bits at a time: a third of base64.b32encode's time, and every delivery has an id
_B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = [first + second for first in _B32_ALPHABET for second in _B32_ALPHABET]
_B32_SHIFTS = tuple(range(150, -1, -10))


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (or of a bare base64 secret).

    Raises ``ValueError`` naming the problem, never echoing the secret itself.
    """
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    if not text:
        raise ValueError("webhook secret is empty (expected whsec_ followed by base64)")
    # Secrets are often pasted without their "=" padding; add what is missing.
    padded = text + "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "webhook secret is not valid base64 (expected whsec_ followed by base64)"
        ) from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"webhook secret decodes to {len(key)} bytes; "
            f"Standard Webhooks needs at least {MIN_SECRET_BYTES} random bytes"
        )
    return key


class Signer:
    """Signs request bodies with one or more secrets (several for key rotation).

    A Signer without secrets still gives ``webhook-id`` and ``webhook-timestamp``,
    just no ``webhook-signature``.
    """

    __slots__ = ("_keys",)

    def __init__(self, secrets: Iterable[str]) -> None:
        self._keys = tuple(parse_secret(s) for s in secrets)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        # Never show key material.
        return f"Signer(<{len(self._keys)} secret(s)>)"

    def signature(self, msg_id: str, timestamp: int, body_chunks: Iterable[bytes] | bytes) -> str:
        """The ``webhook-signature`` value: ``v1,<base64>`` per secret, space-separated."""
        prefix = f"{msg_id}.{timestamp}.".encode()
        macs = [hmac.new(key, prefix, hashlib.sha256) for key in self._keys]
        if isinstance(body_chunks, bytes | bytearray | memoryview):
            body_chunks = (bytes(body_chunks),)
        # One pass over the chunks feeds every key: the chunks may come from a one-shot generator.
        for chunk in body_chunks:
            for mac in macs:
                mac.update(chunk)
        return " ".join("v1," + base64.b64encode(mac.digest()).decode("ascii") for mac in macs)

    def headers(
        self,
        msg_id: str,
        body_chunks: Iterable[bytes] | bytes,
        timestamp: int | None = None,
    ) -> list[tuple[str, str]]:
        """``webhook-id``, ``webhook-timestamp`` and (with secrets) ``webhook-signature``."""
        ts = int(time.time()) if timestamp is None else int(timestamp)
        out = [("webhook-id", msg_id), ("webhook-timestamp", str(ts))]
        if self._keys:
            out.append(("webhook-signature", self.signature(msg_id, ts, body_chunks)))
        return out
