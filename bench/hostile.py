#!/usr/bin/env python3
"""The hostile corpus of issue 15 through a running bridge: per case, the reply, the time to
it, the bridge's peak RSS growth, the worst /healthz latency while it ran and the time of a
small delivery in another session; then 100 sessions holding 1 MiB of unfinished DATA.

Usage: bench/hostile.py [--cases NAME,...|held] [--as-limit MiB] [--no-held]
(--as-limit caps the bridge's address space, so a case that would take all the machine's
memory fails there instead; tests/test_hostile.py asserts the goals on the same figures.)
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bridge_process import BridgeProcess, data_section
from hostile_corpus import (
    CASES,
    PROBE,
    Session,
    form_routes,
    hold_unfinished_data,
    json_body,
    run_case,
    status_kib,
)
from webhook_server import WebhookServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    parser.add_argument("--as-limit", type=int, default=0, help="bridge address space, MiB")
    parser.add_argument("--no-held", action="store_true", help="skip the unfinished-DATA case")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    wanted = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    with WebhookServer() as server:
        for case in wanted:
            # a fresh bridge per case: one case's leftovers (or death) do not colour the next
            with BridgeProcess(server.url, {"LMTP_BRIDGE_ROUTES": form_routes(server)}) as bridge:
                bridge.wait_ready()
                if args.as_limit:
                    limit = args.as_limit << 20
                    resource.prlimit(bridge.process.pid, resource.RLIMIT_AS, (limit, limit))
                warm = Session(bridge.address)
                warm.open_data("warm@example.org")
                warm.sock.sendall(data_section(PROBE))
                warm.reply()
                warm.close()
                time.sleep(0.2)
                idle = status_kib(bridge.process.pid, "VmRSS") / 1024
                try:
                    result = run_case(bridge, server, case)
                except (AssertionError, OSError) as exc:
                    alive = bridge.process.poll() is None
                    print(
                        f"{case.name:22} FAILED ({'alive' if alive else 'bridge died'}): "
                        f"{str(exc)[:150]}",
                        flush=True,
                    )
                    continue
                verdict = "checks ok"
                try:
                    assert result.requests, "no webhook request"
                    for request in result.requests:
                        json_body(request)
                        if case.check is not None:
                            case.check(request)
                except Exception as exc:
                    verdict = f"CHECK FAILED: {type(exc).__name__}: {str(exc)[:100]}"
                print(f"{result.row()}  idle {idle:.0f} MiB  {verdict}", flush=True)
        if not args.no_held and (not args.cases or "held" in args.cases.split(",")):
            with BridgeProcess(server.url) as bridge:
                bridge.wait_ready()
                warm = Session(bridge.address)
                warm.open_data("warm@example.org")
                warm.sock.sendall(data_section(PROBE))
                warm.reply()
                warm.close()
                time.sleep(0.2)
                print(hold_unfinished_data(bridge).row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
