"""Chaos: Postfix delivers thousands of messages through a bridge that is SIGKILLed and restarted
every few seconds, to a webhook that answers 503 or resets the connection on 30 % of requests.

At the end Postfix's queue must be empty, nothing bounced, every (message, recipient) must have
reached the webhook with a 2xx at least once, and all copies of one (message, recipient) must carry
the same delivery id. The counts are printed (run pytest with ``-s`` to see them).

CI runs 2,000 messages; the longer run (docs/postfix.md) is
``LMTP_BRIDGE_CHAOS_MESSAGES=10000 .venv/bin/python -m pytest -s tests/test_postfix_chaos.py``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from bridge_process import free_port
from postfix_harness import (
    Bridge,
    ChaosWebhook,
    Hit,
    PrivatePostfix,
    make_message,
    transport_for,
)

pytestmark = pytest.mark.peer

MESSAGES = int(os.environ.get("LMTP_BRIDGE_CHAOS_MESSAGES", "2000"))
FAILURE_RATE = 0.30  # of webhook requests: half 503, half TCP reset
KILL_EVERY = (1.5, 4.0)  # seconds between two SIGKILLs, uniformly at random
INJECTORS = 4  # concurrent sendmail processes
# a mix of recipients, 1-3 per message, some shared by many messages
RECIPIENTS = [f"user{i}@example.org" for i in range(20)] + [
    f"list{i}@example.net" for i in range(10)
]
SEED = int(os.environ.get("LMTP_BRIDGE_CHAOS_SEED", str(random.randrange(1 << 30))))


class KilledAndRestarted:
    """Keeps a bridge on ``address``; ``run()`` SIGKILLs and restarts it until ``stop``."""

    def __init__(self, webhook_url: str, address: str, env: dict[str, str]) -> None:
        self.webhook_url = webhook_url
        self.address = address
        self.env = env
        self.kills = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.bridge = self._start()

    def _start(self) -> Bridge:
        bridge = Bridge(self.webhook_url, self.env, listen=self.address)
        bridge.wait_ready(30)
        return bridge

    def run(self, rng: random.Random) -> None:
        try:
            while not self.stop.wait(rng.uniform(*KILL_EVERY)):
                self.bridge.process.kill()  # SIGKILL: no drain, no last replies
                self.bridge.close()
                self.kills += 1
                self.bridge = self._start()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.bridge.close()


def test_chaos_kill_and_flaky_webhook_lose_nothing_and_bounce_nothing() -> None:
    rng = random.Random(SEED)
    messages = {
        f"chaos{i}.{SEED}@test": rng.sample(RECIPIENTS, rng.randint(1, 3)) for i in range(MESSAGES)
    }
    expected = {(mid, rcpt) for mid, rcpts in messages.items() for rcpt in rcpts}
    env = {
        "LMTP_BRIDGE_BREAKER_COOLDOWN": "1",  # the breaker may open on 5 failures in a row
        "LMTP_BRIDGE_SHUTDOWN_GRACE": "1",
    }
    started = time.monotonic()
    injected_at: dict[str, float] = {}
    with ChaosWebhook(FAILURE_RATE, seed=SEED) as webhook:
        address = f"127.0.0.1:{free_port()}"
        with PrivatePostfix(transport_for(address)) as postfix:
            chaos = KilledAndRestarted(webhook.url, address, env)
            killer = threading.Thread(target=chaos.run, args=(random.Random(SEED + 1),))
            killer.start()
            try:

                def inject(mid: str) -> None:
                    injected_at[mid] = time.time()
                    postfix.sendmail(
                        make_message(mid, subject=f"chaos {mid}"),
                        "sender@example.org",
                        messages[mid],
                    )

                with ThreadPoolExecutor(INJECTORS) as pool:
                    list(pool.map(inject, messages))
                injected = time.monotonic()

                def delivered() -> int:
                    return len(
                        {(h.message_id, h.rcpt) for h in webhook.snapshot() if h.status == 200}
                    )

                # keep killing while most of the work is still being done (and at least 3 times)
                while (delivered() < 0.9 * len(expected) or chaos.kills < 3) and (
                    time.monotonic() - injected < 240
                ):
                    time.sleep(0.5)
            finally:
                chaos.stop.set()
                killer.join(60)
            try:
                assert chaos.error is None, f"restarting the bridge failed: {chaos.error!r}"
                chaos.bridge.wait_ready(30)
                postfix.wait_queue_empty(300, flush_every=3)
            finally:
                chaos.close()
            outcomes = postfix.outcomes()
            queue_ids = postfix.queue_ids()
        hits = webhook.snapshot()
    elapsed = time.monotonic() - started

    # --- Postfix: every recipient sent, nothing bounced, queue empty (checked above) ---
    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {"sent", "deferred"}, statuses
    sent = {(o.qid, o.rcpt) for o in outcomes if o.status == "sent"}
    mid_of = {qid: mid for mid, qid in queue_ids.items()}
    sent_pairs = {(mid_of.get(qid), rcpt) for qid, rcpt in sent}
    assert sent_pairs == expected, f"{len(expected - sent_pairs)} (message, rcpt) never sent"
    assert len(sent) == len(expected), "a recipient was reported sent twice"

    # --- the webhook: a 2xx for every (message, recipient), one delivery id each ---
    by_pair: dict[tuple[str, str], list[Hit]] = defaultdict(list)
    for hit in hits:
        by_pair[hit.message_id, hit.rcpt].append(hit)
    assert not [h for h in hits if h.mail_from == ""], "Postfix sent a bounce notice"
    assert set(by_pair) == expected, "the webhook got a request for an unknown pair"
    no_2xx = [pair for pair, got in by_pair.items() if not any(h.status == 200 for h in got)]
    assert not no_2xx, f"{len(no_2xx)} pairs Postfix calls sent never got a 2xx: {no_2xx[:5]}"
    mixed_ids = {pair: {h.delivery_id for h in got} for pair, got in by_pair.items()}
    mixed_ids = {pair: ids for pair, ids in mixed_ids.items() if len(ids) != 1}
    assert not mixed_ids, (
        f"copies of one delivery with different ids: {list(mixed_ids.items())[:3]}"
    )
    ids = [got[0].delivery_id for got in by_pair.values()]
    assert len(set(ids)) == len(ids), "two (message, recipient) pairs share a delivery id"

    answers = Counter(h.status for h in hits)
    duplicates = sum(1 for got in by_pair.values() if sum(1 for h in got if h.status == 200) > 1)
    first_2xx = {pair: min(h.at for h in got if h.status == 200) for pair, got in by_pair.items()}
    longest = max(first_2xx[mid, rcpt] - injected_at[mid] for mid, rcpt in expected)
    print(
        f"\nchaos (seed {SEED}): {MESSAGES} messages, {len(expected)} recipients-copies in "
        f"{elapsed:.0f} s; bridge SIGKILLed {chaos.kills} times; webhook requests {len(hits)} "
        f"(2xx {answers[200]}, 503 {answers[503]}, reset {answers[0]}, cut short by a kill "
        f"{webhook.incomplete}); "
        f"pairs delivered 2xx more than once (duplicates) {duplicates}; Postfix deferrals "
        f"{statuses['deferred']}; longest delay injection -> first 2xx {longest:.1f} s"
    )
    assert chaos.kills >= 3, "the bridge must have been killed a few times for this to count"
