"""One finished transaction -> webhook calls -> replies in RCPT order: routing, the deliverer,
retry budget and per-route circuit breakers.

Imports bridge.webhook, bridge.mail, bridge.ops, bridge.base and bridge.lmtp; never server or
config.
"""
