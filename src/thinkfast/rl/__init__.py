"""Reinforcement learning: rollout records and the policy's log-probs (:mod:`.rollout`), the policy-gradient core (sampling and scoring groups, one policy step:
:mod:`.policy`; advantages, group-normalised and leave-one-out: :mod:`.advantages`), GRPO's loss and step
(:mod:`.grpo`), the rewards and their safe runner (:mod:`.rewards`; each built-in reward is a task's grader,
:mod:`thinkfast.tasks`), RL prompts (:mod:`.prompts`), pass rates (:mod:`.pass_rates`) and the pass-rate
curriculum (:mod:`.curriculum`), and the preference losses (:mod:`.preference`: RPO, DPO, IPO)."""
