"""The HTTP side of a delivery: request bodies (json, raw, multipart) rendered from mail's model,
signing, the pooled client and its h11 transport, and the HTTP outcome -> LMTP reply map.

Imports bridge.mail, bridge.ops, bridge.base and bridge.lmtp (for Reply); never delivery or server.
"""
