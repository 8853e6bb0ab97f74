"""LMTP (RFC 2033), sans-IO: bytes in, events out, replies to bytes. One state table (state),
frozen events and the Reply (events), errors that carry their reply (errors), the connection.

Standard library only: imports nothing of the bridge.
"""
