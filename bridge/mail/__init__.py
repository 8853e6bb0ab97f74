"""The message parsed once: headers, bodies, parts, charsets, the email policy,
Authentication-Results. It hands out a model (``ParsedMessage``) that the webhook side renders.

Imports bridge.base and the standard library; never bridge.webhook, delivery or server.
"""
