"""One grader per task, each also a reward with TRL's signature.

A task module holds the check that decides whether a response is right, used as it is by evaluation (the
grader) and by RL (the reward), so the table shows what RL trains on:

* :mod:`.math`: the answer after the think block, parsed and compared by math-verify (``verify(parse(gold),
  parse(answer))``); :class:`~.math.MathGrader` runs it in worker processes, :func:`~.math.math_accuracy` is
  the reward.
* :mod:`.nano`: the nano world's verifier (``Answer: N``, "Answer:" in any case); :func:`~.nano.nano_accuracy`.
* :mod:`.ifeval`: IFEval's 25 instruction checkers, strict and loose, and their arguments checked
  (:func:`~.ifeval.check_instructions`); :func:`~.ifeval.ifeval_strict`, :func:`~.ifeval.ifeval_loose` (all or
  nothing), :func:`~.ifeval.ifeval_share` (the share followed).
* :mod:`.instructions`: instruction-following prompts to grade with them: nano problems with 1-3 instructions
  and the teacher's compliant answer, and a generator that adds instructions to any prompt file (``thinkfast
  ifgen``), never producing one of IFEval's test prompts.
* :mod:`.think_format`: the reasoning toggle's format rule; :func:`~.think_format.think_format`.
* :mod:`.completion`: what every grader reads: a completion's text in TRL's formats and the answer after its
  think block (none when the block is unclosed or malformed).

A reward is ``f(completions, **columns) -> list[float | None]``, as TRL's ``GRPOTrainer`` calls it:
``completions`` holds per sample ``[{"role": "assistant", "content": text}]`` (conversational) or the text;
the keyword arguments are the prompt's dataset columns, one entry per sample. ``None`` for a sample means
"cannot be scored" (e.g. a gold answer that does not parse): RL leaves it out of its group's baseline
(:mod:`thinkfast.rl.advantages`).
"""
