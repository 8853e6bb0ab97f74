"""Memory goals of the issue, measured by bench/memory.py on a bridge subprocess: a 100 MiB
message against a 25 MiB limit is answered 552 per recipient with RSS growth under 10 MiB; an
accepted 50 MiB message in raw mode is streamed from its spool file with RSS growth under
1.5 x 50 MiB. The figures are printed (pytest -s) and go in the conformance notes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "memory.py"


def test_memory_goals_of_big_messages() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--json"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode in (0, 1), run.stderr
    results = {r["scenario"]: r for r in map(json.loads, run.stdout.splitlines())}
    print(run.stdout)
    too_big = results["100 MiB message, 25 MiB limit"]
    assert too_big["replies"] == ["552 5.3.4"] * 3
    assert too_big["webhook_bodies_mib"] == []
    assert too_big["rss_growth_mib"] < 10, too_big
    accepted = results["50 MiB message accepted, raw"]
    assert accepted["replies"] == ["250 2.0.0"]
    assert accepted["webhook_bodies_mib"] == [50.0]
    assert accepted["rss_growth_mib"] < 75, accepted
