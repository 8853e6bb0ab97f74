"""The `lmtp-bridge` command as a user runs it: a real subprocess per case, its exit code and
what it prints. Every failure a user can cause is one line naming what and where, no traceback
(unless --log-level DEBUG); exit codes as the README's "Command line" section says."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from bridge_process import free_port, lmtp_bridge_command

TIMEOUT = 60  # generous: the machine is shared
URL = "http://127.0.0.1:9/hook"  # never contacted in these tests


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LMTP_BRIDGE_")}
    env.update(extra or {})
    return env


def run(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*lmtp_bridge_command(), *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def port_in_use() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def assert_one_line_failure(done: subprocess.CompletedProcess[str], code: int, *names: str) -> str:
    """The failure line (the one naming every one of ``names``), after checking the rest."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "Traceback" not in output, output
    lines = [line for line in done.stderr.splitlines() if all(n in line for n in names)]
    assert len(lines) == 1, output
    return lines[0]


@contextmanager
def serving(*args: str, env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A running `lmtp-bridge ARGS` (text logs on stderr), stopped with SIGTERM afterwards."""
    proc = subprocess.Popen(
        [*lmtp_bridge_command(), *args, "--log-format", "text"],
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)


def read_until(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never logged; stderr: {''.join(seen)}")


# ---- serve is the default command ----------------------------------------------------------


def test_bare_command_is_serve_and_asks_for_the_webhook_url() -> None:
    done = run()
    line = assert_one_line_failure(done, 2, "webhook_url")
    assert line == "lmtp-bridge: config: webhook_url: required unless routes are configured"


def test_serve_flags_without_the_word_serve_start_the_server() -> None:
    args = ("--webhook-url", URL, "--listen", "127.0.0.1:0", "--metrics-listen", "")
    with serving(*args) as proc:
        assert "lmtp-bridge ready" in read_until(proc, "lmtp-bridge ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0


# ---- start-up failures: one line naming the address and the setting ------------------------


def test_lmtp_port_in_use_names_the_address() -> None:
    with port_in_use() as port:
        done = run("serve", "--webhook-url", URL, "--listen", f"127.0.0.1:{port}")
    line = assert_one_line_failure(done, 1, "cannot start")
    assert f"cannot listen on 127.0.0.1:{port} for LMTP (listen): Address already in use" in line


def test_lmtp_port_in_use_with_workers_names_the_address() -> None:
    with port_in_use() as port:
        done = run("--webhook-url", URL, "--listen", f"127.0.0.1:{port}", "--workers", "2")
    line = assert_one_line_failure(done, 1, "cannot start")
    assert f"127.0.0.1:{port} for LMTP (listen)" in line


def test_metrics_port_in_use_names_the_address_and_setting() -> None:
    with port_in_use() as port:
        done = run(
            "serve", "--webhook-url", URL, "--listen", "127.0.0.1:0",
            "--metrics-listen", f"127.0.0.1:{port}",
        )  # fmt: skip
    line = assert_one_line_failure(done, 1, "cannot start")
    assert f"cannot listen on 127.0.0.1:{port} for metrics (metrics_listen)" in line


def test_unresolvable_listen_host_is_named() -> None:
    done = run("--webhook-url", URL, "--listen", "nonexistent.invalid:2424")
    line = assert_one_line_failure(done, 1, "cannot start")
    assert "cannot listen on nonexistent.invalid:2424 for LMTP (listen)" in line


@pytest.mark.parametrize("which", ["lmtp", "receiver"])
def test_demo_port_in_use_is_one_line(which: str) -> None:
    with port_in_use() as port:
        if which == "lmtp":
            ports = ["--listen", f"127.0.0.1:{port}", "--receiver-port", str(free_port())]
            expect = f"127.0.0.1:{port} for LMTP (listen)"
        else:
            ports = ["--listen", "127.0.0.1:0", "--receiver-port", str(port)]
            expect = f"127.0.0.1:{port} for the demo receiver (--receiver-port)"
        done = run("demo", *ports, "--metrics-listen", "")
    line = assert_one_line_failure(done, 1, "cannot start")
    assert expect in line


def test_debug_log_level_adds_the_traceback() -> None:
    with port_in_use() as port:
        done = run(
            "--webhook-url", URL, "--listen", f"127.0.0.1:{port}", "--log-level", "DEBUG",
            "--log-format", "text",
        )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


# ---- send ------------------------------------------------------------------------------------


def test_send_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.eml"
    done = run("send", "--to", "a@x.test", str(missing))
    line = assert_one_line_failure(done, 2, str(missing))
    assert line == f"lmtp-bridge send: cannot read {missing}: No such file or directory"


def test_send_server_without_port_is_a_usage_error() -> None:
    done = run("send", "--to", "a@x.test", "--server", "localhost")
    line = assert_one_line_failure(done, 2, "--server")
    assert "'localhost': expected HOST:PORT" in line


def test_send_refused_connection_names_the_address() -> None:
    port = free_port()
    done = run("send", "--to", "a@x.test", "--server", f"127.0.0.1:{port}")
    line = assert_one_line_failure(done, 1, f"127.0.0.1:{port}")
    assert line == f"lmtp-bridge send: 127.0.0.1:{port}: cannot connect: Connection refused"


# ---- check-config ----------------------------------------------------------------------------


def test_check_config_takes_serves_flags() -> None:
    done = run(
        "check-config", "--webhook-url", "https://hooks.example.org/mail",
        "--listen", "127.0.0.1:2525", "--listen", "unix:/tmp/x.sock", "--payload", "raw",
        "--metrics-listen", "", "--workers", "2", "--log-level", "WARNING",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["webhook_url"] == "https://hooks.example.org/mail"
    assert shown["listen"] == ["127.0.0.1:2525", "unix:/tmp/x.sock"]
    assert (shown["payload"], shown["metrics_listen"], shown["workers"]) == ("raw", "", 2)


def test_check_config_into_a_closed_pipe_is_quiet() -> None:
    # Enough routes that the JSON is far bigger than a pipe's buffer.
    routes = [{"name": f"r{i}", "match": f"*@d{i}.test", "url": URL} for i in range(400)]
    proc = subprocess.Popen(
        [*lmtp_bridge_command(), "check-config"],
        env=clean_env({"LMTP_BRIDGE_ROUTES": json.dumps(routes)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=TIMEOUT) == 0, stderr
    assert stderr == ""


def test_unknown_environment_variable_is_an_error_in_check_config(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" + "\n")
    config = tmp_path / "bridge.toml"
    config.write_text(f'webhook_url = "{URL}"\n')
    env = {
        "LMTP_BRIDGE_HTTP_TIMOUT": "3",
        # legitimate: the config file's name and a setting read from a file
        "LMTP_BRIDGE_CONFIG": str(config),
        "LMTP_BRIDGE_WEBHOOK_SECRET_FILE": str(secret),
    }
    done = run("check-config", env=env)
    line = assert_one_line_failure(done, 2, "LMTP_BRIDGE_")
    assert line == (
        "lmtp-bridge: config: LMTP_BRIDGE_HTTP_TIMOUT: unknown environment variable, "
        "no setting has this name (did you mean LMTP_BRIDGE_HTTP_TIMEOUT?)"
    )
    del env["LMTP_BRIDGE_HTTP_TIMOUT"]
    done = run("check-config", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["webhook_secret"] == ["**********"]


def test_unknown_environment_variable_is_a_warning_at_start() -> None:
    args = ("--webhook-url", URL, "--listen", "127.0.0.1:0", "--metrics-listen", "")
    with serving(*args, env={"LMTP_BRIDGE_HTTP_TIMOUT": "3"}) as proc:
        logged = read_until(proc, "lmtp-bridge ready")
    warnings = [line for line in logged.splitlines() if "LMTP_BRIDGE_HTTP_TIMOUT" in line]
    assert len(warnings) == 1, logged
    assert " WARNING " in warnings[0] and "did you mean LMTP_BRIDGE_HTTP_TIMEOUT?" in warnings[0]


def test_listen_takes_several_addresses_per_flag_and_commas() -> None:
    done = run(
        "check-config", "--webhook-url", URL,
        "--listen", "127.0.0.1:2525", "[::1]:2526", "--listen", "unix:/tmp/a.sock,127.0.0.1:2527",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["listen"] == [
        "127.0.0.1:2525", "[::1]:2526", "unix:/tmp/a.sock", "127.0.0.1:2527",
    ]  # fmt: skip


def test_demo_on_a_receiver_port_the_system_chooses_delivers() -> None:
    lmtp = f"127.0.0.1:{free_port()}"
    with serving("demo", "--listen", lmtp, "--receiver-port", "0", "--metrics-listen", "") as demo:
        assert demo.stdout is not None
        for line in demo.stdout:
            if "lmtp-bridge demo: LMTP on" in line:
                assert "127.0.0.1:0/" not in line, line
                break
        sent = run("send", "--server", lmtp, "--from", "<>", "--to", "bob@example.org")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "bob@example.org: 250 2.0.0" in sent.stdout


def test_the_sample_message_of_a_null_sender_has_a_valid_from() -> None:
    from bridge.cli import _sample_message

    head = _sample_message("<>", ["bob@example.org"], "hi").split(b"\r\n\r\n")[0]
    assert b"From: <MAILER-DAEMON@localhost>" in head.split(b"\r\n")
    assert b"From: <alice@example.org>" in _sample_message("alice@example.org", ["b@x"], "hi")
