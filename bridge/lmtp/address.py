"""The address inside ``<...>`` of MAIL FROM and RCPT TO: strict where an address is clearly
broken, lenient where real mail is (what an MTA in front forwards must never bounce here).

Refused (``501 5.1.3``): a second ``@`` outside quotes, an empty local part or domain, spaces
outside quotes, control characters anywhere, an unclosed quote or address literal, characters
no domain can hold, invalid UTF-8, a path over 256 octets (RFC 5321 4.5.3.1.3). Accepted: the
null sender, quoted local parts (``"a b"@x``, ``"a@b"@x``), address literals (``[192.0.2.1]``,
``[IPv6:2001:db8::1]``), UTF-8 without SMTPUTF8 (Postfix sends it so), source routes
(``@a,@b:u@c``, dropped), any atext (``'``, ``+``, ...), the dot forms of legacy mailboxes
(``a..b@x``, ``a.@x``) and a bare local part (``postmaster``), as Postfix and Dovecot accept them.
"""

from __future__ import annotations

import re

MAX_PATH = 256  # octets of a reverse- or forward-path, angle brackets included
# RFC 5322 specials (and space) that no domain name holds outside an address literal
_NOT_IN_DOMAIN = frozenset(' ()<>[]\\,;:@"')
# RFC 5321 dcontent is %d33-90 / %d94-126; a quote there is no literal (and would confuse
# the search for the path's closing bracket, which skips quoted text)
_NOT_IN_LITERAL = frozenset(' []\\"')


# The common address, which every rule below accepts as it is: a dot-atom-ish local part
# (atext and dots) and a host name. Checked in one C call; anything else takes the long way.
_PLAIN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,189}", re.ASCII)


class AddressError(ValueError):
    """The path is refused; the message says why, in words fit for a reply."""


def parse_path(path: str) -> str:
    """The mailbox of the path between the angle brackets (``""`` for ``<>``), its source
    route dropped; ``path`` is the command's text decoded with surrogateescape.

    Raises AddressError for what is clearly broken (see the module's docstring).
    """
    if _PLAIN.fullmatch(path):  # 64 + 1 + 189 + 2 brackets = MAX_PATH
        return path
    return _parse_path(path)


def _parse_path(path: str) -> str:
    if not path:
        return ""
    if len(path.encode("utf-8", "surrogateescape")) + 2 > MAX_PATH:
        raise AddressError(f"Address longer than {MAX_PATH} octets")
    for char in path:
        if char < " " or "\x7f" <= char <= "\x9f":
            raise AddressError("Control character in address")
        if "\udc80" <= char <= "\udcff":
            raise AddressError("Address is not valid UTF-8")
    mailbox = _drop_source_route(path) if path[0] == "@" else path
    domain_at = _local_part_end(mailbox)
    if domain_at == 0:
        raise AddressError("Empty local part")
    if domain_at == len(mailbox):
        return mailbox  # a bare local part: <postmaster>, or <bob> for the default domain
    if mailbox[domain_at] != "@":
        raise AddressError("Garbage after the quoted local part")
    _check_domain(mailbox[domain_at + 1 :])
    return mailbox


def _drop_source_route(path: str) -> str:
    """``@a,@b:user@c`` -> ``user@c`` (RFC 5321 4.1.2 A-d-l, to be ignored: C.)."""
    end = _outside_literals(path, ":")
    if end < 0:  # no route at all: <@example.org>
        raise AddressError("Empty local part")
    for hop in path[:end].split(","):
        if len(hop) < 2 or hop[0] != "@":
            raise AddressError("Bad source route")
        _check_domain(hop[1:])
    return path[end + 1 :]


def _local_part_end(mailbox: str) -> int:
    """Index of the ``@`` that ends the local part (len(mailbox) if none)."""
    if mailbox.startswith('"'):
        i = 1
        while i < len(mailbox):
            char = mailbox[i]
            if char == "\\":
                i += 2
                continue
            if char == '"':
                return i + 1
            i += 1
        raise AddressError("Unclosed quote in address")
    at = mailbox.find("@")
    local = mailbox if at < 0 else mailbox[:at]
    if " " in local:
        raise AddressError("Space in address outside quotes")
    if any(char in '<>"' for char in local):
        raise AddressError("Bad character in local part")
    return len(mailbox) if at < 0 else at


def _check_domain(domain: str) -> None:
    if not domain:
        raise AddressError("Empty domain")
    if domain[0] == "[":
        end = domain.find("]")
        if end < 0:
            raise AddressError("Unclosed address literal")
        if end != len(domain) - 1:
            raise AddressError("Garbage after the address literal")
        literal = domain[1:end]
        if not literal or any(char in _NOT_IN_LITERAL for char in literal):
            raise AddressError("Bad address literal")
        return
    if "@" in domain:
        raise AddressError("Second @ outside quotes")
    if " " in domain:
        raise AddressError("Space in address outside quotes")
    if any(char in _NOT_IN_DOMAIN for char in domain):
        raise AddressError("Bad character in domain")


def _outside_literals(text: str, wanted: str) -> int:
    """Index of the first ``wanted`` not inside ``[...]``, or -1."""
    depth = 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        elif char == wanted and depth == 0:
            return i
    return -1
