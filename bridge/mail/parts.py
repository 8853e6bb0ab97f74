"""Each leaf MIME part filed as the message's text, its HTML or an ``Attachment``, its
content decoded (transfer encoding undone) with as few copies as we could manage.
"""

from __future__ import annotations

import binascii
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any

from bridge.mail.body import _BodyRef
from bridge.mail.charsets import Defects, _declared_charset, _decode_text
from bridge.mail.emailpolicy import _GENERATOR_POLICY
from bridge.mail.limits import ParseState
from bridge.mail.names import FALLBACK_TYPE, checked_content_type, safe_filename

# A payload longer than this many characters is decoded without the stdlib's copies.
_BIG_PAYLOAD = 64 * 1024
# Characters of a big base64 payload decoded at a time (see _b64_in_slices).
_DECODE_SLICE = 1 << 20

# The stdlib's own base64 body decoder (what Message.get_payload(decode=True) calls); no stub.
_decode_b = importlib.import_module("email._encoded_words").decode_b


@dataclass(frozen=True)
class Attachment:
    """A MIME part that is not the message's text or HTML body."""

    filename: str | None
    content_type: str
    disposition: str | None
    content_id: str | None
    content: bytes  # decoded (base64 / quoted-printable undone)
    charset: str | None = None  # the declared charset parameter, lower case
    text: str | None = None  # an inline text part after the first: decoded, as a client shows it

    def describe(self) -> dict[str, Any]:
        """What is said of the attachment besides its content (the ``message.attachments``
        entry of SPEC section 5 without ``content``)."""
        return {
            "filename": self.filename,
            "content_type": self.content_type,
            "size": len(self.content),
            "disposition": self.disposition,
            "content_id": self.content_id,
            "charset": self.charset,
            "text": self.text,
        }


def _leaves(msg: Message, state: ParseState) -> Iterator[tuple[str, Message]]:
    """The non-multipart parts in order, each with a "part 1.2"-style location; as many as
    the limits let in (deeper nesting, later parts: in "raw" and named in the defects)."""
    limits = state.limits
    stack: list[tuple[str, Message, int]] = [("message", msg, 0)]
    seen = 0
    while stack:
        where, part, depth = stack.pop()
        seen += 1
        if seen > limits.max_mime_parts:
            state.hit(where, "max_mime_parts", "this part and the ones after it are not read")
            return
        if seen % 8 == 0 and state.out_of_time(where):
            return
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            if depth >= limits.max_mime_depth:
                state.hit(where, "max_mime_depth", "the parts inside are not read")
                continue
            prefix = "part " if where == "message" else where + "."
            children = part.get_payload()
            if not isinstance(children, list):
                yield where, part
                continue
            for i in reversed(range(len(children))):
                child = children[i]
                if isinstance(child, Message):
                    stack.append((f"{prefix}{i + 1}", child, depth + 1))
        else:
            yield where, part


def _take_part(
    where: str,
    part: Message,
    fields: dict[str, Any],
    attachments: list[Attachment],
    defects: Defects,
    body: bytes | _BodyRef | None = None,
) -> None:
    """File one leaf part under text, html or attachments; ``body`` is its content when the
    caller took it from the message bytes itself (the body fast path), else it is decoded.
    A ``_BodyRef`` body stays in the message buffer: a text body as a ``BodyText``."""
    ctype = part.get_content_type()
    disposition = part.get_content_disposition()
    filename = part.get_filename()
    ref: _BodyRef | None = None
    if isinstance(body, _BodyRef):
        ref, content = body, b""  # read below, unless the text stays in the buffer
    else:
        content = _part_bytes(where, part, defects) if body is None else body
    del body  # content is now the only reference: the "del content" below frees the bytes
    part.set_payload("")  # taken: its encoded text need not live as long as the tree
    defects.add_all(where, part.defects)

    maintype, _, subtype = ctype.partition("/")
    # A multipart whose boundary never appears is a leaf: its text is the best we have.
    is_text = ctype in ("text/plain", "text/html") or maintype == "multipart"
    is_body = disposition != "attachment" and (filename is None or disposition == "inline")
    key = "html" if subtype == "html" else "text"
    charset = _declared_charset(part)
    if is_text and is_body and fields[key] is None:
        if ref is not None:
            left = ref.text(charset, where, defects)
            if left is not None:
                fields[key] = left
                fields[key + "_charset"] = charset
                return
            content = ref.read()  # declined: decoded in memory, as always
        decoded = _decode_text(where, part, content, defects)
        del content  # before the copy below: one big text fewer at the peak
        # MIME text travels with CRLF line ends; receivers expect newlines
        fields[key] = decoded.replace("\r\n", "\n")
        fields[key + "_charset"] = charset
        return
    if ref is not None:
        content = ref.read()
    content_id = part.get("Content-ID")
    text = None
    if maintype == "text" and is_body:
        text = _decode_text(where, part, content, defects).replace("\r\n", "\n")
    content_type = checked_content_type(ctype)
    if content_type is None:  # e.g. an encoded-word hiding "text/html\r\nX-Inj: 1"
        defects.add(where, f"invalid content type {_shown(ctype)}; taken as {FALLBACK_TYPE}")
        content_type = FALLBACK_TYPE
    if filename is not None:
        safe = safe_filename(filename)
        if safe != filename:
            defects.add(where, "control, bidi or format characters in the file name replaced")
            filename = safe
    attachments.append(
        Attachment(
            filename=filename,
            content_type=content_type,
            disposition=disposition,
            content_id=str(content_id).strip() if content_id is not None else None,
            content=content,
            charset=charset,
            text=text,
        )
    )


def _shown(value: str, limit: int = 60) -> str:
    """``value`` quoted for a defect line: escapes for anything unprintable, cut short."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _part_bytes(where: str, part: Message, defects: Defects) -> bytes:
    try:
        if part.is_multipart():
            # message/rfc822 and friends are parsed into sub-messages: write them back out.
            inner = part.get_payload()
            if isinstance(inner, list):
                messages = [m for m in inner if isinstance(m, Message)]
                if len(messages) == len(inner):
                    return b"".join(_as_bytes(m) for m in messages)
            return _as_bytes(part).partition(b"\r\n\r\n")[2]
        payload = _decoded_payload(part)
        return payload if isinstance(payload, bytes) else b""
    except Exception as exc:
        defects.add(where, f"undecodable content ({type(exc).__name__}: {exc})")
        return b""


def _decoded_payload(part: Message) -> Any:
    """``part.get_payload(decode=True)``, the same bytes and defects, but a large ASCII body
    costs one bytes copy at a time, not the stdlib's str copy, line list and joined lines."""
    payload = getattr(part, "_payload", None)
    cte = str(part.get("content-transfer-encoding", "")).lower()
    if (
        not isinstance(payload, str)
        or len(payload) <= _BIG_PAYLOAD
        or cte in ("quoted-printable", "x-uuencode", "uuencode", "uue", "x-uue")
        or not payload.isascii()
    ):
        return part.get_payload(decode=True)
    if cte == "base64":
        sliced = _b64_in_slices(payload)
        if sliced is not None:
            part.set_payload("")  # the caller has no more use for the text
            return sliced
    data = payload.encode("ascii")
    del payload
    part.set_payload("")  # the caller has no more use for the text
    if cte != "base64":
        return data
    joined = data.translate(None, b"\r\n")  # == b"".join(data.splitlines()) for bytes
    del data
    value, defects = _decode_b(joined)
    for defect in defects:
        part.policy.handle_defect(part, defect)
    return value


def _b64_in_slices(payload: str) -> bytes | None:
    """A big base64 body decoded a slice at a time: a C call holds the GIL throughout, and one
    call over 24 MiB stalled the event loop for 0.1-0.4 s. The same bytes as decode_b, for what
    its first, strict try takes without a defect (well-formed base64 once CR and LF are gone);
    None for anything else, which decode_b then reads whole."""
    out: list[bytes] = []
    carry = b""
    end = len(payload)
    for start in range(0, end, _DECODE_SLICE):
        stop = start + _DECODE_SLICE
        text = carry + payload[start:stop].encode("ascii").translate(None, b"\r\n")
        if stop < end:
            cut = len(text) - len(text) % 4
            text, carry = text[:cut], text[cut:]
            if b"=" in text:  # padding before the end: not strict base64
                return None
        elif len(text) % 4:  # decode_b pads it, with a defect
            return None
        try:
            out.append(binascii.a2b_base64(text, strict_mode=True))
        except binascii.Error:
            return None
    return b"".join(out)


def _as_bytes(msg: Message) -> bytes:
    try:
        return msg.as_bytes(policy=_GENERATOR_POLICY)
    except Exception:  # the bytes generator trips over some broken 8-bit parts
        text = msg.as_string(policy=_GENERATOR_POLICY)
        try:
            return text.encode("utf-8", "surrogateescape")  # back to the original 8-bit bytes
        except UnicodeEncodeError:
            return text.encode("utf-8", "replace")
