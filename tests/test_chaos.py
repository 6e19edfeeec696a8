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


def test_the_checker_is_exact_and_skips_only_near_ties() -> None:
    """What the soak counts as wrong: any text but the reference (a repeated or missing piece
    included); a prompt is left out only when its reference answer has a near tie somewhere."""
    sys.path.insert(0, str(ROOT / "bench"))
    from chaos_load import TIE_MARGIN, Load, Spec, margin_of

    load = Load(gateways=[], model="m", max_tokens=8, timeout_s=1, references={(0, True): "Paris is big."})
    spec = Spec(prompt=0, chat=True, stream=True)
    assert load._judge_text(spec, "Paris is big.", 0).outcome == "ok"
    for bad in ("Paris is is big.", "Paris big.", "Paris is big", ""):
        assert load._judge_text(spec, bad, 1).outcome == "wrong", bad
    step = lambda *lps: {"top_logprobs": [{"logprob": lp} for lp in lps]}  # noqa: E731
    tied = {"logprobs": {"content": [step(-0.1, -3.0), step(-0.70, -0.71)]}}
    clear = {"logprobs": {"content": [step(-0.1, -3.0), step(-0.2, -1.9)]}}
    assert margin_of(tied, True) < TIE_MARGIN <= margin_of(clear, True) == 1.7
    assert margin_of({"logprobs": {"top_logprobs": [{"a": -0.5, "b": -0.51}]}}, False) < TIE_MARGIN
    assert margin_of({"text": "x"}, False) == float("inf")  # no logprobs (the echo engine): exact anyway
