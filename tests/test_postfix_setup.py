"""docs/postfix.md as a user follows it: its main.cf, master.cf and transport-table snippets,
taken from the file, run by a real private Postfix in front of the bridge. Only the addresses are
swapped for this test's (a free port, a socket under /tmp); Postfix's log is the oracle."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from bridge_process import free_port
from postfix_harness import MASTER_CF, Bridge, PrivatePostfix, make_message, postfix_tool
from webhook_server import WebhookServer

pytestmark = pytest.mark.peer

DOC = Path(__file__).resolve().parent.parent / "docs" / "postfix.md"
SENDER = "alice@example.org"
DOC_INET = "127.0.0.1:2424"
DOC_SOCKET = "/run/lmtp-bridge/lmtp.sock"
# Not the bridge: what the doc's settings do not route to it fails loudly instead.
NOT_ROUTED = "error:5.3.0 not routed to the bridge by the doc's settings"


def snippet(first_line: str) -> list[str]:
    """The lines of the doc's code block that starts with ``first_line`` (comment included)."""
    blocks = re.findall(r"```\n(.*?)```", DOC.read_text(), re.DOTALL)
    found = [b.splitlines() for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"docs/postfix.md has no single block starting {first_line!r}"
    return [line for line in found[0][1:] if line.strip()]


def settings(first_line: str, **swap: str) -> dict[str, str]:
    """A main.cf snippet as settings, each of ``swap``'s keys replaced by its value."""
    result = {}
    for line in snippet(first_line):
        name, _, value = line.partition("=")
        value = value.strip()
        for old, new in swap.items():
            value = value.replace(old, new)
        result[name.strip()] = value
    return result


def socket_dir() -> str:
    """A short directory for a unix socket (sun_path is 108 bytes), searchable by postfix."""
    path = Path("/tmp") / f"lbs-{os.getpid()}-{os.urandom(3).hex()}"
    path.mkdir()
    path.chmod(0o755)
    return str(path)


@contextmanager
def bridge(webhook: WebhookServer, listen: str | None = None) -> Iterator[Bridge]:
    with Bridge(webhook.url, listen=listen) as running:
        running.wait_ready()
        yield running


def deliver(postfix: PrivatePostfix, rcpts: list[str]) -> dict[str, tuple[str, str]]:
    """Send one message to ``rcpts``; each recipient's (status, relay) once the queue is empty."""
    postfix.sendmail(make_message("doc@test"), SENDER, rcpts)
    postfix.wait_queue_empty(90)
    return {o.rcpt: (o.status, o.relay) for o in postfix.outcomes() if o.rcpt in rcpts}


def test_the_master_cf_line_is_the_one_the_tests_run() -> None:
    (line,) = snippet("# master.cf: the lmtp client")
    fields = line.split()
    assert fields[0] == "lmtp" and fields[1] == "unix" and fields[4] == "n"  # not chrooted
    assert fields[-2:] == ["lmtp", "flags=X"]
    assert line in MASTER_CF  # what every private Postfix of the tests runs
    blocks = re.findall(r"```\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert not [b for b in blocks if "lmtp_assume_final" in b]  # obsolete: flags=X instead


def test_whole_domains_over_tcp(webhook_server: WebhookServer) -> None:
    with bridge(webhook_server) as running:
        main_cf = settings("# main.cf: whole domains to the bridge over TCP", **{
            DOC_INET: running.address,
        })  # fmt: skip
        main_cf["smtpd_relay_restrictions"] = "permit_mynetworks, reject_unauth_destination"
        port = free_port()
        with PrivatePostfix(NOT_ROUTED, main_cf, smtpd_port=port) as postfix:
            # as mail arrives: by SMTP (Postfix's smtpd on a loopback port, never 25)
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
                smtp.sendmail(SENDER, ["bob@example.org"], make_message("doc@test"))
            postfix.wait_queue_empty(90)
            got = {o.rcpt: (o.status, o.relay) for o in postfix.outcomes()}
            qids = postfix.queue_ids()
    assert got == {"bob@example.org": ("sent", f"127.0.0.1[127.0.0.1]:{running.port}")}
    (request,) = webhook_server.requests
    # lmtp_send_xforward_command: the SMTP client and Postfix's queue id reach the bridge
    xforward = request.json()["envelope"]["xforward"]
    assert xforward["ident"] == qids["doc@test"], xforward
    assert (xforward["addr"], xforward["helo"]) == ("127.0.0.1", "client.test"), xforward


def test_whole_domains_over_a_unix_socket(webhook_server: WebhookServer) -> None:
    path = f"{socket_dir()}/lmtp.sock"
    with bridge(webhook_server, listen=f"unix:{path}"):
        main_cf = settings("# main.cf: whole domains to the bridge over a unix socket", **{
            DOC_SOCKET: path,
        })  # fmt: skip
        with PrivatePostfix(NOT_ROUTED, main_cf) as postfix:
            got = deliver(postfix, ["bob@example.org"])
    assert got == {"bob@example.org": ("sent", f"pfx.test[{path}]")}
    assert len(webhook_server.requests) == 1


def test_a_transport_table(webhook_server: WebhookServer, tmp_path: Path) -> None:
    path = f"{socket_dir()}/lmtp.sock"
    with ExitStack() as stack:
        over_tcp = stack.enter_context(bridge(webhook_server))
        stack.enter_context(bridge(webhook_server, listen=f"unix:{path}"))
        table = tmp_path / "transport"
        lines = snippet("# /etc/postfix/transport")
        table.write_text(
            "".join(line.replace(DOC_INET, over_tcp.address).replace(DOC_SOCKET, path) + "\n"
                    for line in lines)
        )  # fmt: skip
        tmp_path.chmod(0o755)
        main_cf = settings("# main.cf: a transport table", **{
            "/etc/postfix/transport": str(table),
        })  # fmt: skip
        postfix = PrivatePostfix(NOT_ROUTED, main_cf)
        # the doc's "postmap /etc/postfix/transport", with this instance's main.cf
        postmap = [postfix_tool("postmap"), "-c", str(postfix.config_dir), str(table)]
        subprocess.run(postmap, check=True, timeout=60)
        with postfix:
            got = deliver(postfix, ["bob@example.org", "form@hooks.example.net"])
    assert got == {
        "bob@example.org": ("sent", f"127.0.0.1[127.0.0.1]:{over_tcp.port}"),
        "form@hooks.example.net": ("sent", f"pfx.test[{path}]"),
    }
    assert len(webhook_server.requests) == 2


def test_the_boky_postfix_init_script_sets_flags_x(tmp_path: Path) -> None:
    """deploy/postfix-init.d/lmtp-final.sh (compose; the chart's sidecar ConfigMap has the same
    line) turns a stock lmtp line into the doc's, as boky/postfix runs it before Postfix starts."""
    (doc_line,) = snippet("# master.cf: the lmtp client")
    stock = MASTER_CF.replace(doc_line, doc_line.replace(" flags=X", ""))
    assert stock != MASTER_CF
    (tmp_path / "master.cf").write_text(stock)
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n")
    script = DOC.parent.parent / "deploy" / "postfix-init.d" / "lmtp-final.sh"
    env = {**os.environ, "MAIL_CONFIG": str(tmp_path)}
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    postconf = [postfix_tool("postconf"), "-c", str(tmp_path), "-M", "lmtp/unix"]
    shown = subprocess.run(postconf, capture_output=True, text=True, check=True, timeout=60)
    assert shown.stdout.split() == doc_line.split()
