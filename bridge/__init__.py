"""lmtp-bridge: an LMTP server that turns each recipient's copy of a message into a webhook POST."""

__version__ = "0.1.0"
