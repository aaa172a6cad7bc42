"""Pass rates: how often a model solves each RL prompt, the measure the curriculum sorts by
(:mod:`thinkfast.rl.curriculum`; Llama-Nemotron section 5), and the greedy pass rate on held-out prompts.

A completion passes when the pass reward (a :class:`thinkfast.rl.rewards.RewardRunner` of that reward alone)
gives it 1 and it was not cut off; a sample the reward cannot score (``None``) does not pass.
"""

from __future__ import annotations

import statistics

from ..generation import Backend, SamplingParams
from .rollout import rollout
from ..toggle import stop_token_ids
from .rewards import RewardError, RewardFailed, RewardRunner

__all__ = ["held_out_check", "pass_rates", "passed", "sample_rates"]


def _chat(texts: list[str]) -> list:
    return [[{"role": "assistant", "content": t}] for t in texts]


def passed(runner: RewardRunner, texts: list[str], truncated: list[bool], columns: dict[str, list]
           ) -> tuple[list[bool], list[RewardError]]:
    """Whether each completion is solved: ``runner`` (the pass reward alone) gives it 1 and it was not cut off;
    and the reward's error, if it failed (then nothing passed)."""
    total, _, errors = runner(_chat(texts), truncated, columns)
    return [v is not None and v >= 1.0 for v in total], errors


def sample_rates(backend: Backend, tokenizer, prompts: list[list[int]], columns: dict[str, list],
                 runner: RewardRunner, params: SamplingParams, samples: int, stage: str = "grpo"
                 ) -> tuple[list[float], list[float]]:
    """Per prompt, the share of ``samples`` answers (sampled with ``params``) that pass (:func:`passed`), and the
    share that break the toggle's format (``think_format`` 0 in the prompt's mode, from ``columns["thinking"]``, or
    cut off; all 0 without that column). ``columns``: per-prompt reward columns. The pass reward is called once,
    on every sample: if that call fails, every rate would be 0 (and saved for reuse), so it raises
    :class:`RewardFailed` instead (``stage`` names the config section in its message)."""
    from ..tasks.think_format import think_format

    roll = rollout(backend, prompts, samples, params, progress=True)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in roll.completions]
    cut = [c.finish_reason != "stop" for c in roll.completions]
    ok, errors = passed(runner, texts, cut,
                        {**{k: [v[g] for g in roll.groups] for k, v in columns.items()},
                         "completion_ids": [c.token_ids for c in roll.completions]})
    for e in errors:
        raise RewardFailed(f"{stage}: the pass reward {e.reward} failed while measuring the pass rates before "
                           f"training ({e.message}); it would count every prompt unsolved, so nothing was trained "
                           f"or saved: fix the reward (or choose another with {stage}.pass_reward) and run again")
    thinking = columns.get("thinking")
    form = (think_format(_chat(texts), [thinking[g] for g in roll.groups]) if thinking is not None
            else [1.0] * len(texts))
    rates, malformed = [0.0] * len(prompts), [0.0] * len(prompts)
    for g, r, f, c in zip(roll.groups, ok, form, cut):
        rates[g] += r / samples
        malformed[g] += (c or not f) / samples
    return rates, malformed


def pass_rates(backend: Backend, tokenizer, prompts: list[list[int]], columns: dict[str, list], runner: RewardRunner,
               params: SamplingParams, samples: int, stage: str = "grpo") -> list[float]:
    """Share of ``samples`` answers to each prompt, sampled with ``params``, that pass (:func:`sample_rates`'
    first list)."""
    return sample_rates(backend, tokenizer, prompts, columns, runner, params, samples, stage)[0]


def held_out_check(backend: Backend, tokenizer, prompts: list[list[int]], columns: dict[str, list], runner: RewardRunner, *,
                   max_new_tokens: int, batch_size: int) -> tuple[dict, list[RewardError]]:
    """Greedy pass rate, think-format compliance and length on held-out prompts (each in its mode: ``columns``
    has ``thinking``), and the pass reward's error if it failed (then the pass rate is None: unknown, not 0)."""
    from ..tasks.think_format import think_format

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=batch_size, seed=0)
    done = backend.generate(prompts, params)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in done]
    truncated = [c.finish_reason != "stop" for c in done]
    ok, errors = passed(runner, texts, truncated, {**columns, "completion_ids": [c.token_ids for c in done]})
    form = think_format(_chat(texts), columns["thinking"])
    return {"held_out": {"pass": None if errors else statistics.fmean(ok), "format_ok": statistics.fmean(form),
                         "tokens": statistics.fmean(len(c.token_ids) for c in done), "n": len(done)}}, errors
