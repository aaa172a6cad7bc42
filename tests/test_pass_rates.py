"""What GRPO's pass-rate measurement counts as solved and as malformed (``rl.pass_rates.sample_rates``), on
scripted answers: the malformed-first draw (``grpo.unsolved_order``) relies on a cut-off answer and an "on"
answer without its think block counting as malformed, and on an "off" answer that thinks counting too."""

from __future__ import annotations

import pytest

from thinkfast.generation import Completion, SamplingParams
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.rl.pass_rates import sample_rates
from thinkfast.rl.prompts import nano_prompts
from thinkfast.rl.rewards import RewardRunner, load_reward


class Scripted:
    """A backend that answers prompt i's samples with ``answers[i]`` in order (text, finish reason)."""

    def __init__(self, tokenizer, prompts, answers):
        self.tokenizer, self.index = tokenizer, {tuple(p): a for p, a in zip(prompts, answers)}
        self.seen: dict[tuple, int] = {}

    def generate(self, prompts, params, *, hook=None, progress=False):
        out = []
        for p in prompts:
            k = self.seen.get(tuple(p), 0)
            self.seen[tuple(p)] = k + 1
            text, reason = self.index[tuple(p)][k]
            out.append(Completion(self.tokenizer(text, add_special_tokens=False)["input_ids"], reason))
        return out

    def sync(self, model):
        raise ValueError("scripted")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_cut_off_tagless_and_thinking_off_answers_count_as_malformed(tokenizer):
    prompts, columns = nano_prompts(tokenizer, 2, seed=3, kinds=("add",), digits=(2,), steps=(1,), thinking="both")
    assert columns["thinking"] == [True, False]
    a0, a1 = columns["answer"]
    on = [(f"<think>\nadd them\n</think>\n\nAnswer: {a0}", "stop"),  # solved, well formed
          (f"<think>\nadd them\n</think>\n\nAnswer: {a0}", "length"),  # right, but cut off: malformed, never solved
          (f"Answer: {a0}", "stop"),  # right, no think block in "on" mode: solved and malformed
          (f"<think>\nadd them\n</think>\n\nAnswer: {a0 + 1}", "stop")]  # wrong, well formed
    off = [(f"Answer: {a1}", "stop"),  # solved, well formed
           (f"<think>\nadd them\n</think>\n\nAnswer: {a1}", "stop"),  # thinks in "off" mode: solved and malformed
           (f"Answer: {a1 + 1}", "stop"),  # wrong, well formed
           (f"Answer: {a1}", "length")]  # cut off
    backend = Scripted(tokenizer, prompts, [on, off])
    runner = RewardRunner([("nano_accuracy", load_reward("nano_accuracy"), 1.0)])
    rates, malformed = sample_rates(backend, tokenizer, prompts, columns, runner,
                                    SamplingParams(max_new_tokens=8, temperature=1.0), 4)
    # the pass reward (nano_accuracy) reads the answer alone; a cut-off answer never passes
    assert rates == [0.5, 0.5]
    assert malformed == [0.5, 0.5]
