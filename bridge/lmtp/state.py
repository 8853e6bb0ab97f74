"""The states of an LMTP session and the one table of which command is legal where."""

from __future__ import annotations

import enum


class State(enum.Enum):
    CONNECTED = "connected"  # greeting sent, no LHLO yet
    READY = "ready"  # LHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading DATA content
    BDAT = "bdat"  # between or inside BDAT chunks
    BDAT_FAILED = "bdat_failed"  # a chunk failed: BDAT answers 503 until RSET
    REPLYING = "replying"  # message complete, the server owes per-recipient replies
    CLOSED = "closed"


S = State
_COMMAND_STATES = frozenset({S.CONNECTED, S.READY, S.MAIL, S.RCPT, S.BDAT, S.BDAT_FAILED})

# verb -> the states in which it is legal; anywhere else it gets 503 and changes nothing.
LEGAL: dict[str, frozenset[State]] = {
    "LHLO": _COMMAND_STATES,
    "MAIL": frozenset({S.READY}),
    "RCPT": frozenset({S.MAIL, S.RCPT}),
    "DATA": frozenset({S.RCPT}),
    "BDAT": frozenset({S.RCPT, S.BDAT}),
    "RSET": _COMMAND_STATES,
    "NOOP": _COMMAND_STATES,
    "QUIT": _COMMAND_STATES,
    "VRFY": _COMMAND_STATES,
    "HELP": _COMMAND_STATES,
    "XFORWARD": frozenset({S.READY}),
    "STARTTLS": frozenset({S.READY}),
}

# states in which a transaction is open (RSET, LHLO or a lost connection abort it)
IN_TRANSACTION = frozenset({S.MAIL, S.RCPT, S.DATA, S.BDAT, S.BDAT_FAILED})
