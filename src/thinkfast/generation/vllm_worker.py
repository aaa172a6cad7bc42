"""A vLLM generation worker, run by path with a Python that has vLLM (it imports nothing of thinkfast)::

    python vllm_worker.py MODEL_DIR DTYPE MAX_MODEL_LEN MEMORY_FRACTION

Loads the model once (``trust_remote_code``: nemotron-nas folders carry their code), then answers requests,
one JSON line each on stdin: ``{"prompts": [[ids], ...], "max_tokens": N, "temperature": t, "top_p": p,
"top_k": k, "stop_token_ids": [...], "seed": s}``. Each answer is one stdout line starting with :data:`MARK`, then
``{"outputs": [{"token_ids": [...], "finish_reason": "stop" | "length", "logprobs": [...]}]}`` (logprobs of the
sampled tokens, vLLM's ``logprobs=0``), after a ``{"progress": done, "total": n}`` line each time a prompt finishes;
anything else vLLM prints goes to stderr. A request of ``{}`` or end of input ends the worker.
"""

import json
import sys

MARK = "@@thinkfast-vllm@@ "


def _reporter(out):
    """A tqdm class for vLLM's ``use_tqdm`` that draws nothing and writes each update to ``out`` as a progress
    line, so the caller can show its own bar."""
    import os

    from tqdm import tqdm

    class Reporter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 (closed with the bar)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            shown = super().update(n)
            out.write(MARK + json.dumps({"progress": self.n, "total": self.total}) + "\n")
            out.flush()
            return shown

        def close(self):
            f = self.fp
            super().close()
            f.close()

    return Reporter


def main(model: str, dtype: str, max_model_len: int, memory: float) -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # vLLM's own prints must not mix with the answers
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, trust_remote_code=True, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
              enable_prefix_caching=False, seed=0, gpu_memory_utilization=memory)
    try:  # vLLM's CPU build fails a seeded request with top-p ("CPU Generator does not use offset"): there the
        # engine's own seed (0) stands in for per-request seeds (the same requests in the same order sample alike)
        from vllm.platforms import current_platform

        per_request_seeds = not current_platform.is_cpu()
    except Exception:  # noqa: BLE001
        per_request_seeds = False
    out.write(MARK + json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if not req:
            break
        seed = req.get("seed")
        params = [SamplingParams(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                                 top_k=req.get("top_k") or -1,
                                 stop_token_ids=req["stop_token_ids"] or None, logprobs=0,
                                 seed=None if seed is None or not per_request_seeds else (seed + i) % (2 ** 63))
                  for i in range(len(req["prompts"]))]
        results = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], params, use_tqdm=_reporter(out))
        outputs = []
        for r in results:
            o = r.outputs[0]
            ids = list(o.token_ids)
            lps = [d[t].logprob if d is not None and t in d else 0.0 for d, t in zip(o.logprobs or [], ids)]
            outputs.append({"token_ids": ids, "finish_reason": "length" if o.finish_reason == "length" else "stop",
                            "logprobs": lps})
        out.write(MARK + json.dumps({"outputs": outputs}) + "\n")
        out.flush()


if __name__ == "__main__":  # vLLM starts worker processes
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
