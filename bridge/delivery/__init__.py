"""One finished transaction -> webhook calls -> replies in RCPT order: routing, the deliverer,
retry budget, per-route circuit breakers, and recipient verification at RCPT (verify.py).

Imports bridge.webhook, bridge.mail, bridge.ops, bridge.base and bridge.lmtp; never server or
config.
"""
