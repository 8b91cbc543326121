"""Fault injection for the kill-and-resume checks (scripts/chaos.py, tests/rl/test_rl_faults.py) and the non-finite
update checks (`THINKZERO_CHAOS_NAN_AT=step`: every loss of that training step becomes NaN, in any process; used where
a test cannot monkeypatch, e.g. under accelerate launch).

`THINKZERO_CHAOS_KILL_AT=phase:step` makes the process SIGKILL itself when it reaches that phase of that (1-based)
training step, so a test can land a kill exactly where it hurts most (half a checkpoint on disk); `phase:step:TERM` or
`phase:step:INT` sends it SIGTERM or SIGINT instead (a preemption notice, a Ctrl-C: see rl.signals). Unset — the
normal case — every call is a dictionary lookup and nothing else. Phases, in the order a step passes them:
    rollout     completions sampled, not yet scored
    scoring     completions scored, advantages not yet computed
    update      gradients computed, optimizer not yet stepped
    checkpoint  weights written into the temporary checkpoint directory, trainer state and COMPLETE not yet
"""

from __future__ import annotations

import os
import signal

ENV = "THINKZERO_CHAOS_KILL_AT"
NAN_ENV = "THINKZERO_CHAOS_NAN_AT"
PHASES = ("rollout", "scoring", "update", "checkpoint")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}


def parse(value: str) -> tuple[str, int]:
    """'update:3' -> ('update', 3) (so does 'update:3:TERM'); anything else is an error that names the accepted form."""
    phase, _, rest = value.partition(":")
    step, _, name = rest.partition(":")
    if phase not in PHASES or not step.isdigit() or (name and name not in SIGNALS):
        raise ValueError(f"{ENV}={value!r} must look like <phase>:<step> with phase one of {', '.join(PHASES)}, "
                         f"optionally followed by :<signal> with signal one of {', '.join(SIGNALS)}")
    return phase, int(step)


def kill_point(phase: str, step: int) -> None:
    """SIGKILLs this process (no cleanup, like the OOM killer) if THINKZERO_CHAOS_KILL_AT names this phase and step;
    sends it SIGTERM / SIGINT instead when the value ends in :TERM / :INT."""
    value = os.environ.get(ENV)
    if value and parse(value) == (phase, step):
        os.kill(os.getpid(), SIGNALS[value.split(":")[2] if value.count(":") == 2 else "KILL"])


def nan_point(loss, step: int):
    """The loss, or NaN in its place if THINKZERO_CHAOS_NAN_AT names this (1-based) training step."""
    value = os.environ.get(NAN_ENV)
    if value and int(value) == step:
        return loss * float("nan")
    return loss
