"""Generation in real vLLM: a :class:`~thinkfast.generation.sampler.Backend` over a model folder, served by a vLLM
worker process (:mod:`.vllm_worker`, run with a Python that has vLLM, e.g. ``.venv-vllm/bin/python`` from
``scripts/setup_vllm.sh``). The model is loaded once per backend; each :meth:`VLLMBackend.generate` call is one
``LLM.generate`` of the whole batch (vLLM schedules it: ``batch_size`` is not used).

For evaluation (``eval.engine: vllm``): the worker reads the folder, not an in-process model, so ``sync`` and
per-step hooks (the thinking budget) are not supported (ValueError). Sampled runs differ from thinkfast's engine
(another random stream; on vLLM's CPU build, which fails per-request seeds with top-p, the engine's one seeded
stream); greedy runs agree up to float rounding in the dtype chosen (``tests/test_vllm.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .sampler import Completion, SamplingParams

__all__ = ["VLLMBackend", "default_vllm_python"]

_WORKER = Path(__file__).with_name("vllm_worker.py")
MARK = "@@thinkfast-vllm@@ "


def default_vllm_python() -> str:
    """``THINKFAST_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of the current folder when it exists, else this
    Python."""
    env = os.environ.get("THINKFAST_VLLM_PYTHON")
    if env:
        return env
    local = Path(".venv-vllm/bin/python")
    return str(local) if local.is_file() else sys.executable


class VLLMBackend:
    """Generate with real vLLM over ``model_dir`` (module docstring). Use as a context manager or call
    :meth:`close`; the worker starts on the first :meth:`generate`."""

    def __init__(self, model_dir: str | Path, *, python: str | None = None, dtype: str = "bfloat16",
                 max_model_len: int = 4096, memory: float = 0.3, log: Callable[[str], None] | None = None):
        self.model_dir, self.python = str(model_dir), python or default_vllm_python()
        self.dtype, self.max_model_len = dtype, max_model_len
        self.memory = memory  # vLLM's gpu_memory_utilization: on a CPU, the share of RAM it may take
        self.log = log
        self._proc: subprocess.Popen | None = None
        self._stderr: list[str] = []

    def __repr__(self) -> str:
        return f"VLLMBackend({self.model_dir!r}, {self.dtype})"

    def _drain(self, stream) -> None:
        for line in stream:
            self._stderr.append(line)
            del self._stderr[:-200]

    def _read(self, progress: Callable[[int], object] | None = None) -> dict:
        """The worker's next answer; its progress lines (prompts finished so far) go to ``progress``."""
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(MARK):
                msg = json.loads(line[len(MARK):])
                if "progress" in msg:
                    if progress is not None:
                        progress(msg["progress"])
                    continue
                return msg
            self._stderr.append(line)
        code = self._proc.wait()
        causes = [line.strip() for line in self._stderr if "Error: " in line or "Exception: " in line]
        last = next((line.strip() for line in reversed(self._stderr) if line.strip()), "no output")
        self._proc = None
        # one line (the command line prints a RuntimeError's first line): vLLM's first error, e.g. too little free
        # memory for its share (VLLMBackend(memory=...)) while other processes hold it; the tail under --debug
        err = RuntimeError(f"the vLLM worker ({self.python}) for {self.model_dir} stopped (exit {code}): "
                           f"{causes[0] if causes else last}")
        err.add_note("".join(self._stderr[-30:]))
        raise err

    def _start(self) -> None:
        if not Path(self.python).is_file() and os.sep in self.python:
            raise FileNotFoundError(f"{self.python}: no Python with vLLM there (scripts/setup_vllm.sh makes "
                                    ".venv-vllm)")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vLLM's venv, not this one's path
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self._proc = subprocess.Popen([self.python, str(_WORKER), self.model_dir, self.dtype, str(self.max_model_len),
                                       str(self.memory)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, bufsize=1, env=env)
        threading.Thread(target=self._drain, args=(self._proc.stderr,), daemon=True).start()
        self._read()  # {"ready": true}

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, hook: Callable | None = None,
                 progress: bool = False) -> list[Completion]:
        if hook is not None:
            raise ValueError("the vLLM backend runs no per-step hook (e.g. a thinking budget): use eval.engine: "
                             "thinkfast for that")
        if not prompts:
            return []
        if self._proc is None:
            self._start()
        req = {"prompts": [list(map(int, p)) for p in prompts], "max_tokens": params.max_new_tokens,
               "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
               "stop_token_ids": list(params.stop_token_ids), "seed": params.seed}
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        from tqdm.auto import tqdm

        with tqdm(total=len(prompts), desc="generate (vLLM)", unit="seq", disable=not progress) as bar:
            outputs = self._read(lambda done: bar.update(done - bar.n))["outputs"]
        return [Completion(o["token_ids"], o["finish_reason"], o["logprobs"]) for o in outputs]

    def sync(self, model) -> None:
        raise ValueError("the vLLM backend generates from its model folder; it cannot take new weights")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.write("{}\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
