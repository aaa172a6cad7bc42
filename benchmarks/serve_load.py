"""Load test of ``thinkfast serve``: continuous batching vs transformers' plain ``generate`` loop, same HTTP stack.

Both servers (`thinkfast serve --engine continuous` and `--engine generate`) run the same model folder (default:
the main job's SFT child, runs/nano/sft/model) as subprocesses; for each concurrency level, ``--clients``
clients of the official ``openai`` client (AsyncOpenAI) send chat requests back to back for ``--seconds``
seconds (nano problems of 1-2 digits, reasoning on, temperature 0.6 / top-p 0.95, as the paper evaluates;
``max_tokens`` 512). Requests started inside the window are all awaited and counted; requests/s is completed
requests over the time until the last one finished. Rounds alternate between the two servers (machine noise),
and each server is measured at every level in every round. Also reported: p50 / p99 latency, generated
tokens/s, and the share of answers that are right (both engines should be alike: a check that batching
changes nothing).

Each server runs at each of ``--threads`` torch threads (the engine thread sets it: OpenMP's count is per calling
thread). On the 2-core build machine a batch of one decodes 2.7x faster at one thread than at two (the nano model
is too small to split), so the level of one client is the fairest at one thread and the loaded levels at two.

Writes benchmarks/results/serve_load.{json,md}.

    python benchmarks/serve_load.py [--model DIR] [--clients 1 8 32] [--seconds 30] [--rounds 2] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from thinkfast.nano import tasks

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, engine: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    exe = str(Path(sys.executable).parent / "thinkfast")
    proc = subprocess.Popen([exe, "serve", "--model", model, "--port", str(port),
                             "--engine", engine, "--served-model-name", "m", "--threads", str(threads)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() - t0 > 120:
            raise RuntimeError(f"{engine} server did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)


async def load(base: str, clients: int, seconds: float, seed: int) -> dict:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
    rng = random.Random(seed)
    latencies: list[float] = []
    tokens = correct = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker():
        nonlocal tokens, correct
        while time.perf_counter() < deadline:
            problem = tasks.sample_problem(rng, rng.choice(tasks.KINDS), rng.choice((1, 2)), 2)
            start = time.perf_counter()
            r = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": tasks.chat_prompt(problem)}], temperature=0.6,
                top_p=0.95, max_tokens=512, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
            latencies.append(time.perf_counter() - start)
            tokens += r.usage.completion_tokens
            correct += bool(r.choices[0].message.content) and tasks.verify(problem, r.choices[0].message.content)

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    await client.close()
    lat = sorted(latencies)
    return {"requests": len(lat), "elapsed_s": round(elapsed, 2), "requests_per_s": len(lat) / elapsed,
            "tokens_per_s": tokens / elapsed, "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))], "accuracy": correct / len(lat)}


def measure(args, threads: int) -> tuple[dict, dict]:
    """Both servers at ``threads`` torch threads, every concurrency level, rounds alternating."""
    servers = {e: start(args.model, e, threads) for e in ("continuous", "generate")}
    runs: dict[str, dict[int, list[dict]]] = {e: {c: [] for c in args.clients} for e in servers}
    try:
        for rnd in range(args.rounds):
            for c in args.clients:
                for e in (("continuous", "generate") if rnd % 2 == 0 else ("generate", "continuous")):
                    r = asyncio.run(load(servers[e][1], c, args.seconds, seed=1000 * rnd + c))
                    runs[e][c].append(r)
                    print(f"threads {threads} round {rnd} clients {c:3d} {e:10s} {r['requests_per_s']:.2f} req/s "
                          f"p50 {r['p50_s']:.2f} s p99 {r['p99_s']:.2f} s {r['tokens_per_s']:.0f} tok/s "
                          f"acc {r['accuracy']:.2f}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    summary = {}
    for c in args.clients:
        row = {}
        for e in servers:
            rs = runs[e][c]
            n = sum(r["requests"] for r in rs)
            keys = ("requests_per_s", "tokens_per_s", "p50_s", "p99_s")
            row[e] = {k: statistics.mean(r[k] for r in rs) for k in keys}
            row[e]["accuracy"] = sum(r["accuracy"] * r["requests"] for r in rs) / n
            row[e]["requests"] = n
        row["speedup_requests_per_s"] = row["continuous"]["requests_per_s"] / row["generate"]["requests_per_s"]
        summary[c] = row
    return summary, runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "runs/nano/sft/model"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="torch threads of each server (one measurement per value)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_load"))
    args = ap.parse_args()
    results = {t: measure(args, t) for t in args.threads}
    out = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), "model": args.model,
           "seconds": args.seconds, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "summary": {t: s for t, (s, _) in results.items()},
           "runs": {t: r for t, (_, r) in results.items()}}
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| threads | clients | engine | requests/s | p50 latency (s) | p99 latency (s) | tokens/s "
             "| right answers |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    names = {"continuous": "thinkfast (continuous batching)", "generate": "transformers generate, one at a time"}
    for t, (summary, _) in results.items():
        for c, row in summary.items():
            for e in ("continuous", "generate"):
                m = row[e]
                lines.append(f"| {t} | {c} | {names[e]} | {m['requests_per_s']:.2f} | {m['p50_s']:.2f} | "
                             f"{m['p99_s']:.2f} | {m['tokens_per_s']:.0f} | {m['accuracy']:.2f} ({m['requests']}) |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
