"""Delivery ids and Standard Webhooks signatures, checked against the reference library."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bridge.base.transaction import MessageBuffer
from bridge.webhook.signing import Signer, delivery_id, parse_secret

SECRET_A = "whsec_" + base64.b64encode(b"A" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(bytes(range(40))).decode()
SECRET_C = "whsec_" + base64.b64encode(b"C" * 24).decode()
BODY = '{"version":1,"text":"Grüße"}'.encode()


def as_dict(headers: list[tuple[str, str]]) -> dict[str, str]:
    return dict(headers)


# --- delivery ids -------------------------------------------------------------------


def test_delivery_id_format_is_url_and_header_safe() -> None:
    did = delivery_id(hashlib.sha256(b"message").digest(), "bob@example.net")
    assert re.fullmatch(r"msg_[a-z2-7]{26,32}", did)


@pytest.mark.parametrize("recipient", ["bob@example.net", "jörg@exämple.org", "", "x" * 300])
def test_delivery_id_is_the_documented_hash(recipient: str) -> None:
    """Ids must not change between versions: a retry after an upgrade is deduplicated by it."""
    digest = hashlib.sha256(recipient.encode() + b"message").digest()
    tagged = b"lmtp-bridge delivery-id v1\x00" + digest + recipient.encode()
    want = base64.b32encode(hashlib.sha256(tagged).digest()[:20]).decode().lower()
    assert delivery_id(digest, recipient) == "msg_" + want


def test_delivery_id_is_stable_for_the_same_message_and_recipient() -> None:
    # An MTA retry sends the same bytes again: it must carry the same id.
    first = MessageBuffer(1 << 20)
    first.write(b"Subject: hi\r\n\r\nbody\r\n")
    retry = MessageBuffer(4)  # spooled this time: the id must not depend on that
    retry.write(b"Subject: hi\r\n")
    retry.write(b"\r\nbody\r\n")
    assert delivery_id(first.digest(), "bob@example.net") == delivery_id(
        retry.digest(), "bob@example.net"
    )


def test_delivery_id_differs_per_recipient_and_per_message() -> None:
    digest = hashlib.sha256(b"message").digest()
    ids = {
        delivery_id(digest, "bob@example.net"),
        delivery_id(digest, "carol@example.net"),
        delivery_id(digest, "Bob@example.net"),  # local parts are case-sensitive
        delivery_id(hashlib.sha256(b"other message").digest(), "bob@example.net"),
    }
    assert len(ids) == 4


def test_delivery_id_accepts_utf8_addresses() -> None:
    digest = hashlib.sha256(b"m").digest()
    assert delivery_id(digest, "jörg@exämple.org") != delivery_id(digest, "jorg@example.org")


# --- signatures ---------------------------------------------------------------------


def test_published_test_vector() -> None:
    # The example from the Standard Webhooks / Svix documentation.
    signer = Signer(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
    headers = as_dict(
        signer.headers("msg_p5jXN8AQM9LWM0D4loKWxJek", b'{"test": 2432232314}', 1614265330)
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_reference_library_verifies_our_signature() -> None:
    headers = Signer([SECRET_A]).headers("msg_abc", BODY)
    assert Webhook(SECRET_A).verify(BODY, as_dict(headers)) == {"version": 1, "text": "Grüße"}


def test_signing_streams_over_chunks() -> None:
    chunks = (BODY[i : i + 5] for i in range(0, len(BODY), 5))  # a one-shot generator
    signer = Signer([SECRET_A, SECRET_B])
    streamed = as_dict(signer.headers("msg_abc", chunks, 1_700_000_000))
    whole = as_dict(signer.headers("msg_abc", BODY, 1_700_000_000))
    assert streamed == whole
    headers = as_dict(signer.headers("msg_abc", iter([BODY[:7], BODY[7:]])))
    Webhook(SECRET_B).verify(BODY, headers)


def test_signing_a_spooled_message_body() -> None:
    buf = MessageBuffer(16)
    text = "Subject: x\r\n\r\n" + "héllo wörld\r\n" * 2000
    buf.write(text.encode())
    assert buf.spooled
    headers = as_dict(Signer([SECRET_A]).headers("msg_spool", buf.iter_chunks(chunk_size=100)))
    Webhook(SECRET_A).verify(text.encode(), headers, json_parse=False)


def test_key_rotation_each_secret_verifies() -> None:
    headers = as_dict(Signer([SECRET_A, SECRET_B]).headers("msg_rot", BODY))
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    Webhook(SECRET_A).verify(BODY, headers)
    Webhook(SECRET_B).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_C).verify(BODY, headers)


def test_tampered_body_or_id_fails() -> None:
    headers = as_dict(Signer([SECRET_A]).headers("msg_abc", BODY))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY.replace(b"1", b"2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY, {**headers, "webhook-id": "msg_other"})


def test_secret_without_prefix_or_padding_is_accepted() -> None:
    bare = base64.b64encode(bytes(range(40))).decode()
    unpadded = SECRET_C.rstrip("=")
    assert parse_secret(bare) == bytes(range(40))
    assert parse_secret(unpadded) == b"C" * 24
    assert parse_secret(f"  {SECRET_A}\n") == b"A" * 32  # as read from a mounted file
    headers = as_dict(Signer([bare]).headers("msg_abc", BODY))
    Webhook(SECRET_B).verify(BODY, headers)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("", "empty"),
        ("whsec_", "empty"),
        ("whsec_not*base64!", "base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "5 bytes"),
    ],
)
def test_bad_secrets_are_refused_clearly(secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        parse_secret(secret)
    if len(secret) > len("whsec_"):
        assert secret.removeprefix("whsec_") not in str(info.value)
    with pytest.raises(ValueError):
        Signer(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", secret])


def test_signer_without_secrets_sends_no_signature() -> None:
    signer = Signer([])
    assert not signer
    headers = as_dict(signer.headers("msg_abc", BODY, 1_700_000_000))
    assert headers == {"webhook-id": "msg_abc", "webhook-timestamp": "1700000000"}


def test_signer_repr_hides_secrets() -> None:
    signer = Signer([SECRET_A])
    assert SECRET_A.removeprefix("whsec_") not in repr(signer)
    assert "1 secret" in repr(signer)
