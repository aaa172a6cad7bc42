"""Smoke test of benchmarks/trl_align_speed.py: each comparison (RLOO, DPO, reward model) runs one step per side at
tiny sizes and writes its result. Skipped without TRL (the ``bench`` extra). The timings mean nothing here."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = ["--steps", "0", "--prompts", "2", "--group", "2", "--gen-tokens", "16", "--stop-extra", "100", "--pairs", "2",
        "--rm-pairs", "2", "--max-len", "512"]  # many stop tokens: short completions, few cut off


@pytest.fixture
def bench():
    import torch

    import trl_align_speed

    threads = torch.get_num_threads()
    yield trl_align_speed
    torch.set_num_threads(threads)  # the benchmark sets its own thread count


@pytest.mark.parametrize("which", ["rloo", "dpo", "reward"])
def test_one_step_each_side(bench, which, tmp_path):
    out = tmp_path / "result.json"
    res = bench.main(TINY + ["--only", which, "--out", str(out)])[which]
    assert res["trl_seconds_per_step"] > 0 and res["thinkfast_seconds_per_step"] > 0
    assert res["speedup"] == pytest.approx(res["trl_seconds_per_step"] / res["thinkfast_seconds_per_step"])
    assert len(res["trl_step_times"]) == len(res["thinkfast_step_times"]) == 1
    written = json.loads(out.read_text())
    assert written[which]["settings"] == res["settings"] and written["machine"]["torch_threads"] == 2
    assert written["dtype"] == "float32" and set(written) >= {"torch", "trl", "thinkfast", "args"}
    if which == "rloo":
        assert res["thinkfast_updates_per_step"] == [1]
        assert res["settings"]["samples_per_step"] == 4 and res["speedup_per_completion_token"] > 0
    else:  # both sides train on the same token ids
        assert res["tokens_per_step"][0] > 0 and res["settings"]["rows_per_step"] == 4


def test_pairs_are_a_correct_and_a_wrong_answer(bench):
    from thinkfast.nano import tasks

    problems = tasks.make_problems(3, seed=0, kinds=tasks.KINDS, digits=(1, 2))
    for p, row in zip(problems, bench.preference_rows(problems)):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert tasks.verify(p, chosen) and not tasks.verify(p, rejected)
        assert chosen[:chosen.rindex("Answer:")] == rejected[:rejected.rindex("Answer:")]
