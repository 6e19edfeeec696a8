"""A short chaos soak (bench/chaos.py, ~50 s): mixed and hostile load through two gateways onto three
nodes (the scripted echo engine, in their own processes) and a 3-server NATS cluster, while nodes,
gateways, cluster members and the job worker are killed and restarted. Nothing may hang, no answer
may differ from the undisturbed one, no hostile request may get a 5xx, and every log, vote and job
must come through. The 10-minute run with the real model is in docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_chaos_soak_loses_and_corrupts_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    argv = [sys.executable, str(ROOT / "bench/chaos.py"), "--engine", "echo", "--duration", "50"]
    argv += ["--fault-every", "5", "--request-timeout", "30", "--job-every", "4", "--json", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(out.read_text())
    tally = result["tally"]
    kinds = {line.split()[1] for line in result["faults"]}
    assert kinds >= {"node-kill", "node-stop", "gateway-kill", "nats-kill", "node-term", "worker-kill"}, kinds
    assert tally["sent"] > 50 and tally["ok"] > 0.8 * tally["sent"], tally
    for bad in ("hung", "wrong", "broken", "soak-error", "hostile hung", "hostile error5xx"):
        assert tally.get(bad, 0) == 0, (bad, result["notes"])
    assert tally["resumed and whole"] > 0  # hang-ups and dead gateways were resumed, whole
    assert tally["hostile rejected"] > 0
    assert tally["logs stored"] == tally["logs written"] > 0
    assert tally["votes stored"] == tally["votes written"] > 0
    assert tally.get("logs+votes stored twice", 0) == 0
    assert tally["jobs done"] == tally["jobs with the right result"] == tally["jobs submitted"] > 0
