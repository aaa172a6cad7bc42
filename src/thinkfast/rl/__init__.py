"""Reinforcement learning: rewards (:mod:`.rewards`), GRPO's advantages and loss (:mod:`.grpo`) and the
pass-rate curriculum (:mod:`.curriculum`)."""
