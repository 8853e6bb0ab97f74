"""mail's model as JSON, made once per message and shared by every recipient's body.

The ``message`` object is a template of body pieces: its big texts cut out as their own
pieces (a text left in the buffer JSON-escaped once into a ``SpooledText``), and each
attachment's content a lazy base64 piece made as the body is sent, so only the decoded bytes
stay in memory. ``rendered(parsed)`` keeps it with the ``ParsedMessage``: ``close()`` frees it.
"""

from __future__ import annotations

import base64
import functools
import secrets
from typing import Any

import orjson

from bridge.base.transaction import MessageBuffer
from bridge.mail.bodytext import BodyText
from bridge.mail.parsed import ParsedMessage
from bridge.mail.parts import Attachment
from bridge.webhook.pieces import (
    _BIG_STR,
    _b64_chunks,
    _b64_length,
    _b64_stream,
    _dumps,
    _expand,
    _Lazy,
    _Piece,
    _splice,
)
from bridge.webhook.textstream import SpooledText


class JsonMessage:
    """The ``message`` object and the ``defects`` list of one message as JSON body pieces."""

    def __init__(self, parsed: ParsedMessage) -> None:
        self.parsed = parsed
        self.spooled: list[SpooledText] = []  # the texts escaped into spools, closed by close()
        try:
            # The message object as pieces; an int k stands for ',"content":"<base64>"' of
            # attachment k (left out of the variant without content).
            self._template = self._build_template()
        except BaseException:
            self.close()
            raise
        self._defects: bytes | None = None

    def message_pieces(self, with_content: bool = True) -> list[_Piece]:
        """The ``message`` object as body pieces: the same bytes as _dumps() of it whole."""
        out: list[_Piece] = []
        for item in self._template:
            if not isinstance(item, int):
                out.append(item)
            elif with_content:
                content = self.parsed.attachments[item].content
                out += [
                    b',"content":"',
                    _Lazy(_b64_length(len(content)), functools.partial(_b64_chunks, content)),
                    b'"',
                ]
        return out

    def defects_json(self) -> bytes:
        if self._defects is None:
            self._defects = _dumps(self.parsed.defects)
        return self._defects

    def close(self) -> None:
        for text in self.spooled:
            text.close()

    def _build_template(self) -> list[bytes | int | _Lazy]:
        # Big str values and the attachments' content are dumped as placeholders, then put
        # in as their own pieces: never one big JSON str and its UTF-8 copy beside them.
        fields, attachments = self.parsed.fields, self.parsed.attachments
        if not attachments and not any(_is_big(v) for v in fields.values()):
            # the common case: nothing to cut out (and no random token to draw)
            return [_dumps({**fields, "attachments": []})]
        token = "lmtp-bridge-" + secrets.token_hex(12)
        big: list[str | SpooledText] = []

        def slot(value: Any) -> Any:
            if isinstance(value, BodyText):
                value = self._escaped(value)
            if _is_big(value):
                big.append(value)
                return f"{token}s{len(big) - 1}"
            return value

        obj = {k: slot(v) for k, v in fields.items() if k != "attachments"}
        described = []
        for i, attachment in enumerate(attachments):
            one = attachment.describe()
            one["text"] = slot(one["text"])
            one["content"] = f"{token}c{i}"  # "content" is the last key of the object
            described.append(one)
        obj["attachments"] = described
        for ensure_ascii in (False, True):
            try:
                return _splice(obj, big, token, ensure_ascii)
            except (UnicodeEncodeError, orjson.JSONEncodeError):
                continue  # a lone surrogate: \u-escapes keep the JSON valid
        raise AssertionError("unreachable")

    def _escaped(self, text: BodyText) -> SpooledText | str:
        """The text JSON-escaped once for every send; decoded in memory if that fails."""
        try:
            # An in-memory message (below spool_threshold) keeps its text in memory too: a
            # file would cost more than it saves (256 KiB: 0.54 -> 0.40 ms without it).
            spooled = SpooledText.escape(text, in_memory=not text.message.spooled)
        except Exception:  # a full spool disk, say: the in-memory decode gives the same
            return text.text()
        self.spooled.append(spooled)
        return spooled


def rendered(parsed: ParsedMessage) -> JsonMessage:
    """The message's JSON pieces, made on first use and kept until ``parsed.close()``."""
    return parsed.keep(JsonMessage, functools.partial(JsonMessage, parsed))


def message_json(parsed: ParsedMessage, with_content: bool = True) -> bytes:
    """The serialised ``message`` object, joined (a body uses the pieces)."""
    return b"".join(_expand(rendered(parsed).message_pieces(with_content)))


def attachment_object(attachment: Attachment, with_content: bool) -> dict[str, Any]:
    """One ``message.attachments`` entry, dumped whole (the template makes the same bytes)."""
    out = attachment.describe()
    if with_content:
        out["content"] = base64.b64encode(attachment.content).decode("ascii")
    return out


def raw_pieces(message: MessageBuffer) -> list[_Piece]:
    """The whole message as a base64 JSON string, encoded as it is sent."""
    encoded = _Lazy(_b64_length(message.size), lambda: _b64_stream(message.iter_chunks()))
    return [b'"', encoded, b'"']


def _is_big(value: Any) -> bool:
    """A value the template cuts out into its own pieces."""
    if isinstance(value, BodyText | SpooledText):
        return True
    return isinstance(value, str) and len(value) > _BIG_STR
