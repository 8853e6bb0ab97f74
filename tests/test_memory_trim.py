"""bridge.base.memory: freed message memory goes back to the system. In a fresh interpreter,
100 buffers of 1 MB in 64 KiB pieces (the session's reads), interleaved with objects that stay:
freed, glibc keeps the pages; ``memory.trim()`` gives them back. The running bridge does it on
its own (tests/test_hostile.py, unfinished DATA). And the budget every session's buffer shares
(spool_memory_limit): past it, a message goes on in its spool file."""

from __future__ import annotations

import json
import subprocess
import sys

from bridge.base.transaction import MemoryBudget, MessageBuffer

SCRIPT = r"""
import json
from bridge.base import memory
from bridge.base.transaction import MessageBuffer

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

before = rss_mib()
buffers = [MessageBuffer(spool_threshold=2 << 20) for _ in range(100)]
kept = []
for i in range(16):
    for buf in buffers:
        buf.write(bytes([i]) * 65000)
        kept.append(bytearray(1000))  # long-lived objects between the pieces
held = rss_mib()
for buf in buffers:
    buf.close()
buffers = None
freed = rss_mib()
pending = memory.pending()
trimmed = memory.trim()
print(json.dumps({"before": before, "held": held, "freed": freed, "after": rss_mib(),
                  "pending": pending, "trimmed": trimmed}))
"""


def test_trim_gives_freed_message_memory_back() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    print(figures)
    assert figures["trimmed"], "no glibc malloc_trim here (the bridge targets glibc)"
    assert figures["pending"] >= 100 * 16 * 65000  # each closed buffer said what it freed
    assert figures["held"] - figures["before"] > 90  # the 100 MB were there
    assert figures["after"] < figures["before"] + 10, figures


def test_messages_past_the_shared_memory_budget_spool() -> None:
    budget = MemoryBudget(limit=1000)
    first = MessageBuffer(1 << 20, budget=budget)
    first.write(b"x" * 600)
    assert not first.spooled and budget.used == 600
    second = MessageBuffer(1 << 20, budget=budget)
    second.write(b"y" * 300)
    second.write(b"y" * 300)  # 1,200 > 1,000: this one goes on in a file
    assert second.spooled and second.getvalue() == b"y" * 600
    assert budget.used == 600
    first.close()
    assert budget.used == 0
    third = MessageBuffer(1 << 20, budget=budget)
    third.write(b"z" * 900)
    assert not third.spooled and budget.used == 900
    third.close()
    second.close()
    assert budget.used == 0
