"""STARTTLS (RFC 3207; CONFORMANCE X15, §4 item 12): optional, offered only with a certificate,
never required; plaintext pipelined after STARTTLS is discarded; LHLO again; not re-advertised.

The core with plain bytes, then the running bridge with a TLS client on a real socket, and the
real peers openssl s_client (-starttls lmtp) and swaks (--tls).
"""

from __future__ import annotations

import ssl
import subprocess

import pytest
import trio
from bridge_process import HOSTNAME, AsyncLmtp, StartBridge, data_section, message, tool
from lmtp_driver import Session
from webhook_server import WebhookServer

from bridge.lmtp.events import StartTls
from bridge.lmtp.state import State


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A fresh self-signed certificate and key (openssl, a Debian package CI installs)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", f"/CN={HOSTNAME}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def client_context(cert: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = True
    return context


# ---------------------------------------------------------------------------- the core


def tls_session() -> Session:
    session = Session()
    session.conn.starttls = True
    return session


def test_X15_starttls_is_offered_only_with_a_certificate() -> None:
    plain = Session()
    assert b"STARTTLS" not in plain.send(b"LHLO c\r\n")
    assert plain.send(b"STARTTLS\r\n").startswith(b"502 5.5.1")
    offered = tls_session()
    assert b"250-STARTTLS\r\n" in offered.send(b"LHLO c\r\n") or b"250 STARTTLS\r\n" in (
        offered.out.wire
    )


def test_X15_starttls_syntax_and_sequence() -> None:
    session = tls_session()
    assert session.send(b"STARTTLS\r\n").startswith(b"503 5.5.1")  # before LHLO
    session.send(b"LHLO c\r\n")
    assert session.send(b"STARTTLS now\r\n").startswith(b"501 ")
    session.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\n")
    assert session.send(b"STARTTLS\r\n").startswith(b"503 5.5.1")  # inside a transaction
    session.send(b"RSET\r\n")
    assert session.send(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"


def test_X15_plaintext_pipelined_after_starttls_is_discarded_and_lhlo_is_needed_again() -> None:
    session = tls_session()
    session.send(b"LHLO c\r\nXFORWARD ADDR=192.0.2.1\r\n")
    injected = b"RSET\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<a@x>\r\n"
    wire = session.send(b"STARTTLS\r\n" + injected)
    assert wire == b"220 2.0.0 Ready to start TLS\r\n"  # the injected commands get no reply
    (start,) = [e for e in session.out.events if isinstance(e, StartTls)]
    assert start.discarded == len(injected)
    conn = session.conn
    assert conn.state is State.CONNECTED and conn.lhlo is None and conn.xforward == {}
    # "after TLS": the client must start over, and STARTTLS is not offered again
    assert session.send(b"MAIL FROM:<s@x>\r\n").startswith(b"503 5.5.1 Send LHLO first")
    lhlo = session.send(b"LHLO c\r\n")
    assert lhlo.startswith(b"250-") and b"STARTTLS" not in lhlo
    assert session.send(b"STARTTLS\r\n").startswith(b"503 5.5.1 TLS is already active")


# ---------------------------------------------------------------------------- the bridge


async def start_tls(client: AsyncLmtp, cert: str) -> AsyncLmtp:
    stream = trio.SSLStream(client.stream, client_context(cert), server_hostname=HOSTNAME)
    await stream.do_handshake()
    return AsyncLmtp(stream)


async def test_X15_bridge_discards_injected_plaintext_and_delivers_inside_tls(
    start_bridge: StartBridge, webhook_server: WebhookServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    running = await start_bridge(tls_cert_file=cert, tls_key_file=key)
    client = await AsyncLmtp.connect(running.lmtp_addresses[0])
    assert (await client.reply()).code == 220
    lhlo = await client.command("LHLO client.test")
    assert "STARTTLS" in lhlo.lines
    with trio.fail_after(10):
        # an attacker's RSET + MAIL pipelined in the same segment as STARTTLS
        await client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
        ready = await client.reply()
        assert (ready.code, ready.status) == (220, "2.0.0")
        assert client._parser.buffer == b""  # nothing else came in plaintext
        tls = await start_tls(client, cert)
        # the first reply inside TLS answers our NOOP, not the injected RSET
        assert (await tls.command("NOOP")).code == 250
        assert (await tls.command("MAIL FROM:<alice@example.org>")).code == 503  # LHLO first
        again = await tls.command("LHLO client.test")
        assert again.code == 250 and "STARTTLS" not in again.lines
        await tls.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert [(await tls.reply()).code for _ in range(3)] == [250, 250, 354]
        await tls.send(data_section(message()) + b"QUIT\r\n")
        replies = await tls.rest_until_eof()
    assert [r.code for r in replies] == [250, 221]
    assert [r.rcpt for r in webhook_server.requests] == ["bob@example.org"]
    assert webhook_server.requests[0].json()["envelope"]["mail_from"] == "alice@example.org"


async def test_S28_received_says_lmtps_after_starttls_and_lmtp_without(
    start_bridge: StartBridge, webhook_server: WebhookServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    running = await start_bridge(tls_cert_file=cert, tls_key_file=key, payload="raw")
    with trio.fail_after(10):
        for use_tls in (True, False):
            client = await AsyncLmtp.connect(running.lmtp_addresses[0])
            await client.greet()
            if use_tls:
                assert (await client.command("STARTTLS")).code == 220
                client = await start_tls(client, cert)
                assert (await client.command("LHLO client.test")).code == 250  # no new greeting
            await client.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            assert [(await client.reply()).code for _ in range(3)] == [250, 250, 354]
            await client.send(data_section(message()) + b"QUIT\r\n")
            assert [r.code for r in await client.rest_until_eof()] == [250, 221]
    received = [r.body.split(b"\r\n\r\n")[0] for r in webhook_server.requests]
    assert b" with LMTPS id " in received[0] and b" with LMTP id " in received[1]


async def test_X15_tls_is_never_required(
    start_bridge: StartBridge, webhook_server: WebhookServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    running = await start_bridge(tls_cert_file=cert, tls_key_file=key)
    client = await AsyncLmtp.connect(running.lmtp_addresses[0])
    await client.greet()
    await client.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert [(await client.reply()).code for _ in range(3)] == [250, 250, 354]
    await client.send(data_section(message()))
    assert (await client.reply()).code == 250
    assert len(webhook_server.requests) == 1


async def test_X15_failed_handshake_ends_only_that_session(
    start_bridge: StartBridge, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    running = await start_bridge(tls_cert_file=cert, tls_key_file=key)
    client = await AsyncLmtp.connect(running.lmtp_addresses[0])
    await client.greet()
    assert (await client.command("STARTTLS")).code == 220
    await client.send(b"this is not a TLS ClientHello\r\n" * 4)
    with trio.fail_after(10):
        assert await client.rest_until_eof() == []
    other = await AsyncLmtp.connect(running.lmtp_addresses[0])
    await other.greet()
    assert (await other.command("NOOP")).code == 250


def test_X15_tls_key_without_certificate_is_a_config_error(certificate: tuple[str, str]) -> None:
    from bridge.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="tls_cert_file: required when tls_key_file is set"):
        load_settings(overrides={"tls_key_file": certificate[1]}, environ={})
    with pytest.raises(ConfigError, match="tls_cert_file"):
        load_settings(overrides={"tls_cert_file": "/nonexistent/cert.pem"}, environ={})
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        load_settings(overrides={"tls_cert_file": __file__}, environ={})  # not PEM


# ---------------------------------------------------------------------------- real peers


async def run_peer(args: list[str], stdin: bytes = b"") -> tuple[int, str]:
    with trio.fail_after(60):
        result = await trio.run_process(
            args, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")


@pytest.mark.peer
async def test_X15_openssl_s_client_starttls_lmtp(
    start_bridge: StartBridge, webhook_server: WebhookServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    running = await start_bridge(tls_cert_file=cert, tls_key_file=key)
    script = (
        b"LHLO openssl.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
        b"DATA\r\n" + data_section(message()) + b"QUIT\r\n"
    )
    _, out = await run_peer(
        [
            *(tool("openssl"), "s_client", "-starttls", "lmtp"),
            *("-connect", running.lmtp_addresses[0], "-CAfile", cert, "-verify_return_error"),
            *("-verify_hostname", HOSTNAME, "-quiet", "-ign_eof"),
        ],
        script,
    )
    assert "221 2.0.0" in out, out
    assert "250 2.0.0" in out and "verify error" not in out, out
    assert [r.rcpt for r in webhook_server.requests] == ["bob@example.org"]


@pytest.mark.peer
async def test_X15_swaks_tls(
    start_bridge: StartBridge, webhook_server: WebhookServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    running = await start_bridge(tls_cert_file=cert, tls_key_file=key)
    code, out = await run_peer(
        [
            *(tool("swaks"), "--protocol", "LMTP", "--server", running.lmtp_addresses[0], "--tls"),
            *("--from", "alice@example.org", "--to", "bob@example.org,carol@example.org"),
        ]
    )
    assert code == 0, out
    assert "<-  220 2.0.0 Ready to start TLS" in out, out
    inside = out.split("=== TLS started")[-1]
    assert " ~> LHLO" in inside and "STARTTLS" not in inside, out  # LHLO again, no re-offer
    assert sorted(r.rcpt for r in webhook_server.requests) == [
        "bob@example.org",
        "carol@example.org",
    ]
