"""STARTTLS for the LMTP listener (RFC 3207): the server-side TLS context.

Optional and never required: offered only when a certificate is configured, because many LMTP
clients (OpenSMTPD's, Exim's lmtp transport) cannot do TLS at all.
"""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str | None = None) -> ssl.SSLContext:
    """A TLS server context with the certificate chain (and key) from PEM files.

    Raises ``ValueError`` naming the file when the certificate or key cannot be used.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # no client certificates asked for; the MTA authenticates by network position
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        where = f"{cert_file}" + (f" / {key_file}" if key_file else "")
        raise ValueError(f"cannot load the TLS certificate and key from {where}: {exc}") from exc
    return context
