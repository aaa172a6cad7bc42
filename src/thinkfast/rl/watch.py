"""What an RL stage does with reward errors: log each, warn once per reward, stop when one fails for too long.

Shared by the policy-gradient stages (``grpo``, ``rloo``). A reward that fails counts 0 where it fails
(:class:`thinkfast.rl.rewards.RewardRunner`); :class:`RewardWatch` writes every failure as a ``reward_error`` line of
the stage's log, warns on the console the first time each reward fails, and raises
:class:`~thinkfast.rl.rewards.RewardFailed` when a reward has failed on every call for ``max_failing_steps`` steps in
a row (otherwise the run would train on the other rewards alone), keeping the last checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .rewards import RewardError, RewardFailed, RewardFailures

__all__ = ["RewardWatch"]


class RewardWatch:
    """Reward failures of one run: ``stage`` names the config section in messages, ``log`` is the stage's
    JSON-lines logger, ``folder`` the stage's folder (for messages), ``checkpoint`` its checkpoint folder."""

    def __init__(self, stage: str, rewards, log, folder: Path, checkpoint: Path, max_failing_steps: int | None):
        self.stage, self.log, self.folder, self.checkpoint = stage, log, Path(folder), Path(checkpoint)
        self.max_failing_steps = max_failing_steps
        self.failures = RewardFailures(list(rewards))
        self.warned: set[str] = set()

    def replay(self, steps_log: list[dict]) -> None:
        """A resumed run: count the failures of the steps before the checkpoint."""
        for r in steps_log:
            self.failures.add(r.get("reward_failed", {}))

    def report(self, errors: list[RewardError], step: int, **where) -> None:
        """Log every reward error; warn on the console once per reward, when it first fails."""
        for e in errors:
            self.log.log("reward_error", step=step, reward=e.reward, error=e.message, detail=e.detail, **where)
            if e.reward not in self.warned:
                self.warned.add(e.reward)
                print(f"{self.stage}: warning: reward {e.reward} failed at step {step}"
                      f"{' (held-out check)' if where else ''}: {e.message}. It counts 0 where it fails; each "
                      f"failure is a reward_error line in {self.folder.name.removesuffix('.partial')}/log.jsonl",
                      file=sys.stderr)

    def step(self, errors: list[RewardError], step: int) -> dict[str, str]:
        """One training step's reward errors (``step`` counts from 0): report, count, and raise
        :class:`RewardFailed` when a reward has failed on every call for ``max_failing_steps`` steps in a row.
        Returns ``{reward: message}`` of this step's failures (the step record's ``reward_failed``)."""
        self.report(errors, step + 1)
        failed = {e.reward: e.message for e in errors}
        self.failures.add(failed)
        for name in self.failures.names if self.max_failing_steps else ():
            k = self.failures.in_a_row[name]
            if k >= self.max_failing_steps:  # before the step is checkpointed
                kept = (f"the last checkpoint ({self.checkpoint}) is kept" if self.checkpoint.exists()
                        else "no checkpoint had been written yet")
                raise RewardFailed(
                    f"{self.stage}: reward {name} failed on every call for {k} step{'s in a row' if k > 1 else ''} "
                    f"(step{f's {step + 2 - k}-' if k > 1 else ' '}{step + 1}; {self.stage}.max_failing_steps="
                    f"{self.max_failing_steps}), last error: {self.failures.last_error[name]}. Stopped without "
                    f"saving: {kept}; fix the reward and run the same command again")
        return failed

    def summary(self) -> dict:
        """Print each reward that failed at all; return the counts (``metrics.json``'s ``reward_errors``)."""
        for name, c in self.failures.counts().items():
            if c["failed"]:
                print(f"{self.stage}: reward {name} failed {c['failed']} of {c['calls']} calls (last error: "
                      f"{c['last_error']}); it counted 0 where it failed", file=sys.stderr)
        return self.failures.counts()
