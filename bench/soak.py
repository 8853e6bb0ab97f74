#!/usr/bin/env python3
"""Soak: a private Postfix delivers through one long-running bridge at a steady rate; the bridge's
RSS and open file descriptors are sampled. Not part of CI (an hour by default).

    .venv/bin/python bench/soak.py                       # 1 hour, 20 messages/s
    .venv/bin/python bench/soak.py --minutes 10 --rate 20 --failure-rate 0.1

Every message has 1-3 recipients; the webhook (tests/postfix_harness.py ChaosWebhook) answers 200,
or 503 / a reset on --failure-rate of the requests, so deferrals and retries are part of the load.
Prints one line per sample, then a summary comparing the second tenth of the run (the first is
warm-up) with the last tenth, by median RSS and fds: "flat" when RSS grew less than --rss-slack
MiB and fds less than --fd-slack.
Exits 1 if mail was lost or bounced, or the queue did not drain; 2 if RSS or fds were not flat.
Needs root and Debian's postfix package (as the tests do).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bridge_process import free_port
from postfix_harness import (
    Bridge,
    ChaosWebhook,
    PrivatePostfix,
    make_message,
    transport_for,
)

RECIPIENTS = [f"user{i}@example.org" for i in range(50)]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--failure-rate", type=float, default=0.1)
    parser.add_argument("--rss-slack", type=float, default=10.0, help="MiB")
    parser.add_argument("--fd-slack", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    sent_messages: dict[str, list[str]] = {}
    samples: list[tuple[float, int, int, int, int]] = []  # t, rss KiB, fds, queue, hits
    env = {"LMTP_BRIDGE_BREAKER_COOLDOWN": "1", "LMTP_BRIDGE_LOG_LEVEL": "WARNING"}
    with ChaosWebhook(args.failure_rate, seed=args.seed) as webhook:
        address = f"127.0.0.1:{free_port()}"
        with Bridge(webhook.url, env, listen=address) as bridge:
            bridge.wait_ready()
            pid = bridge.process.pid
            with PrivatePostfix(transport_for(address)) as postfix:
                stop = threading.Event()

                def sampler() -> None:
                    start = time.monotonic()
                    while True:
                        t = time.monotonic() - start
                        sample = (
                            t,
                            rss_kib(pid),
                            open_fds(pid),
                            len(postfix.queue()),
                            len(webhook.hits),
                        )
                        samples.append(sample)
                        print(
                            f"t={t:7.0f}s  rss={sample[1] / 1024:7.1f} MiB  fds={sample[2]:4d}  "
                            f"queued={sample[3]:5d}  webhook requests={sample[4]:7d}",
                            flush=True,
                        )
                        if stop.wait(args.sample_every):
                            return

                sampling = threading.Thread(target=sampler)
                sampling.start()
                deadline = time.monotonic() + args.minutes * 60
                interval = 1.0 / args.rate
                next_at = time.monotonic()
                with ThreadPoolExecutor(4) as pool:
                    i = 0
                    while time.monotonic() < deadline:
                        mid = f"soak{i}@test"
                        rcpts = rng.sample(RECIPIENTS, rng.randint(1, 3))
                        sent_messages[mid] = rcpts
                        pool.submit(
                            postfix.sendmail,
                            make_message(mid, body="soak\n" * rng.randint(1, 2000)),
                            "sender@example.org",
                            rcpts,
                        )
                        i += 1
                        next_at += interval
                        time.sleep(max(0.0, next_at - time.monotonic()))
                print("injection done; waiting for Postfix's queue to drain", flush=True)
                drained = True
                try:
                    postfix.wait_queue_empty(600, flush_every=5)
                except AssertionError as exc:
                    drained = False
                    print(f"queue did not drain: {str(exc)[:500]}")
                stop.set()
                sampling.join()
                outcomes = postfix.outcomes()
                final_rss, final_fds = rss_kib(pid), open_fds(pid)

    expected = {(mid, r) for mid, rcpts in sent_messages.items() for r in rcpts}
    got_2xx = {(h.message_id, h.rcpt) for h in webhook.hits if h.status == 200}
    bounced = sum(1 for o in outcomes if o.status not in ("sent", "deferred"))
    lost = len(expected - got_2xx)
    # the second tenth (after warm-up) against the last tenth of the run
    tenth = max(1, len(samples) // 10)
    first, last = samples[tenth : 2 * tenth], samples[-tenth:]
    rss0 = statistics.median(s[1] for s in first) / 1024
    rss1 = statistics.median(s[1] for s in last) / 1024
    fd0 = statistics.median(s[2] for s in first)
    fd1 = statistics.median(s[2] for s in last)
    flat = rss1 - rss0 < args.rss_slack and fd1 - fd0 < args.fd_slack
    print(
        f"\nsoak: {args.minutes:g} min at {args.rate:g} msg/s, failure rate {args.failure_rate:g}: "
        f"{len(sent_messages)} messages, {len(expected)} recipient copies, "
        f"{len(webhook.hits)} webhook requests, {sum(o.status == 'deferred' for o in outcomes)} "
        f"deferrals, {bounced} bounced, {lost} never got a 2xx, queue drained: {drained}\n"
        f"RSS median 2nd tenth {rss0:.1f} MiB, last tenth {rss1:.1f} MiB, "
        f"max {max(s[1] for s in samples) / 1024:.1f} MiB, after drain {final_rss / 1024:.1f} MiB\n"
        f"fds median 2nd tenth {fd0:g}, last tenth {fd1:g}, max {max(s[2] for s in samples)}, "
        f"after drain {final_fds}\n"
        f"verdict: {'flat' if flat else 'NOT flat'}"
    )
    if lost or bounced or not drained:
        return 1
    return 0 if flat else 2


if __name__ == "__main__":
    sys.exit(main())
