"""Time whole models in vLLM: run by path with a Python that has vLLM (it imports nothing of thinkfast).

    python vllm_timer.py spec.json out.json

``spec.json``: ``{"models": {name: folder}, "batch_sizes": [..], "prefill_len": N, "decode_context": N,
"warmup": N, "repeats": N, "dtype": "float32", "eager": true, "decode_steps": 8}``. Each folder needs only
a ``config.json`` (weights are vLLM's dummy ones: only shapes matter). For each model and batch size:

- ``prefill_s``: ``generate`` of ``b`` random prompts of ``prefill_len`` tokens, one new token each;
- ``decode_s``: from prompts of ``decode_context`` tokens, ``(T(1 + k new tokens) - T(1 new token)) / k``
  with ``k = decode_steps``: the time of one decode step of the batch.

Medians over ``repeats`` after ``warmup`` calls. Prefix caching is off (a repeated prompt would be cached).
Writes ``{name: {"prefill_s": {b: s}, "decode_s": {b: s}}}``.
"""

import json
import random
import statistics
import sys
import time


def _median_time(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(spec_path, out_path):
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    bmax = max(spec["batch_sizes"])
    length = max(spec["prefill_len"], spec["decode_context"]) + spec.get("decode_steps", 8) + 8
    out = {}
    for name, path in spec["models"].items():
        llm = LLM(model=path, trust_remote_code=True, dtype=spec["dtype"], load_format="dummy",
                  skip_tokenizer_init=True, enforce_eager=spec.get("eager", True), max_model_len=length,
                  max_num_seqs=bmax, max_num_batched_tokens=max(bmax * length, 2048), enable_prefix_caching=False,
                  gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.5), seed=0)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        rng = random.Random(0)
        res = {"prefill_s": {}, "decode_s": {}}
        for b in spec["batch_sizes"]:
            def run(n, new, b=b):
                prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]} for _ in range(b)]
                params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True,
                                        detokenize=False)
                return lambda: llm.generate(prompts, params, use_tqdm=False)

            k = spec.get("decode_steps", 8)
            res["prefill_s"][str(b)] = _median_time(run(spec["prefill_len"], 1), spec["warmup"], spec["repeats"])
            # decode = (time of 1 + k new tokens - time of 1) / k; on a noisy machine the difference of two
            # medians can come out <= 0 for a tiny model: measure again with more repeats, and if it never turns
            # positive take the whole generation's time per token (an overestimate, never zero)
            repeats = spec["repeats"]
            for _ in range(4):
                one = _median_time(run(spec["decode_context"], 1), spec["warmup"], repeats)
                more = _median_time(run(spec["decode_context"], 1 + k), spec["warmup"], repeats)
                if more > one:
                    break
                repeats *= 2
            res["decode_s"][str(b)] = (more - one) / k if more > one else more / (1 + k)
        out[name] = res
        llm = None  # frees the engine before the next model
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":  # vLLM starts worker processes
    main(sys.argv[1], sys.argv[2])
