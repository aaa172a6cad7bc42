"""vLLM serves what thinkfast writes: nemotron-nas checkpoints loaded in real ``vllm.LLM`` (the CPU build, in
``.venv-vllm``, made by ``scripts/setup_vllm.sh``) give our greedy tokens and our prompt log-probs.

Models: mixed KV-head counts (4 / 2 / 1), no-op attention and no-op FFN, three FFN widths, tied and untied
embeddings, an FFN-Fusion result (two FFNs fused into one of width 768), a real Puzzle child (library for vLLM,
scores, costs, search on a random Llama parent), Llama-3 RoPE scaling with a prompt of 400 tokens, far past
``original_max_position_embeddings`` (64), so scaling shapes every position's frequencies. Widths are multiples of
256 (what vLLM reads through ``ffn_mult``); linear blocks are not tested here: vLLM has none.

SmolLM2-135M-Instruct's shapes (hidden 576, 9 query heads of 64 over 3 KV heads, FFN 1536, tied embeddings, RoPE
theta 1e5, 4 layers instead of 30, the nano vocabulary): its Llama folder as the parent stage leaves it (vLLM
loads it as Llama, thinkfast converts it on load), the same folder converted on disk
(``thinkfast.artifacts.convert_checkpoint``), and a child of those shapes (1 KV head, FFN widths 1280 / 768 / 256,
a no-op attention and a no-op FFN). All our references come from ``thinkfast.artifacts.load_decilm``.

Tolerance: float32 on both sides; prompt log-probs agree within 1e-4 (measured: 3e-6).
"""

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import thinkfast  # noqa: F401
from thinkfast.artifacts import convert_checkpoint, load_decilm
from thinkfast.modeling import DeciLMConfig, DeciLMForCausalLM, attention_block, block_config, ffn_block
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.rundir import StageDir
from thinkfast.stages import Inputs, costs, library, scores, search

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("THINKFAST_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
H = 256
# SmolLM2-135M-Instruct's config.json, less its depth and vocabulary
SMOL = dict(hidden_size=576, num_attention_heads=9, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

RUNNER = r"""
import json, sys
if __name__ == "__main__":  # vLLM starts worker processes
    from vllm import LLM, SamplingParams
    out = {}
    for name, case in json.load(open(sys.argv[1])).items():
        llm = LLM(model=case["path"], trust_remote_code=True, dtype="float32", max_model_len=1024,
                  enforce_eager=True, gpu_memory_utilization=0.3)
        res = llm.generate([{"prompt_token_ids": case["prompt"]}],
                           SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0, ignore_eos=True))[0]
        lp = [None if d is None else d[t].logprob for d, t in zip(res.prompt_logprobs, case["prompt"])]
        out[name] = {"greedy": list(res.outputs[0].token_ids), "prompt_lp": lp[1:]}
        del llm
    json.dump(out, open(sys.argv[2], "w"))
"""


def build(tmp: Path, name: str, tied: bool, seed: int) -> dict:
    tok = build_tokenizer()
    blocks = [block_config(attention_block(1), ffn_block(512, H)),
              block_config(attention_block(no_op=True), ffn_block(768, H)),
              block_config(attention_block(2), ffn_block(None, H, no_op=True)),
              block_config(attention_block(4), ffn_block(256, H))]
    cfg = DeciLMConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=len(blocks), num_attention_heads=4,
                       block_configs=blocks, max_position_embeddings=2048, rope_theta=500000.0, rope_scaling=LLAMA3,
                       tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that a wrong RoPE or block would change the tokens
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    path = tmp / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return reference(path, seed)


def reference(path: Path, seed: int) -> dict:
    """Our greedy tokens and prompt log-probs for a 400-token prompt, from the saved folder (a Llama folder is
    converted on load, as every stage loads its parent)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = load_decilm(path)
    rng = random.Random(seed)
    text = "Problem: " + " ".join(str(rng.randint(0, 99)) for _ in range(200))
    prompt = tok(text, add_special_tokens=False)["input_ids"][:400]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        greedy = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    return {"path": str(path), "prompt": prompt, "greedy": greedy,
            "prompt_lp": [float(lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]}


def puzzle_child(tmp: Path) -> Path:
    """A real Puzzle child: a random Llama parent (hidden 256, FFN 768, 4 KV heads) through library (for
    vLLM), scores, costs and search with a size target."""
    tok = build_tokenizer()
    torch.manual_seed(2)
    parent = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=H, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, rope_theta=500000.0, rope_scaling=LLAMA3,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    parent.save_pretrained(tmp / "parent")
    tok.save_pretrained(tmp / "parent")
    run = tmp / "run"
    p = Inputs({"parent": tmp / "parent"})
    library.run(library.LibraryConfig(engine="vllm", kv_heads=[2, 1], ffn_fractions=[0.67, 0.34], calibration_rows=2,
                                      bld_steps=2, batch_size=2, seq_len=64, device="cpu"), StageDir(run, "library"), p)
    both = Inputs({"parent": tmp / "parent", "library": run / "library" / "library"})
    scores.run(scores.ScoresConfig(rows=2, seq_len=64, batch_size=2, device="cpu"), StageDir(run, "scores"), both)
    costs.run(costs.CostsConfig(batch_sizes=[1], prefill_len=8, decode_context=8, warmup=0, repeats=1, rounds=1,
                                device="cpu"), StageDir(run, "costs"), both)
    parent_params = sum(x.numel() for x in parent.parameters())
    m = search.run(search.SearchConfig(speedup=None, max_params=0.7 * parent_params, batch_size=1, device="cpu"),
               StageDir(run, "search"), Inputs({**both, "scores": run / "scores" / "scores.json",
                                                "costs": run / "costs" / "costs.json"}))
    assert m["params"] <= 0.7 * parent_params  # the child is smaller than its parent
    return run / "search" / "model"


def randomize(model, seed: int, bias: float = 0.1):
    """Weights large enough that a wrong RoPE, head grouping or block would change the greedy tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.add_(bias * torch.randn_like(p))
    return model


def smol_parent(tmp: Path, seed: int = 4) -> tuple[Path, Path]:
    """A random Llama of SmolLM2-135M-Instruct's shapes (4 layers): its folder, and that folder converted to
    nemotron-nas on disk."""
    tok = build_tokenizer()
    llama = randomize(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), num_hidden_layers=4, num_key_value_heads=3, intermediate_size=1536, **SMOL,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval(), seed)
    llama.save_pretrained(tmp / "smol llama")
    tok.save_pretrained(tmp / "smol llama")
    convert_checkpoint(tmp / "smol llama", tmp / "smol parent")
    assert json.loads((tmp / "smol parent" / "config.json").read_text())["model_type"] == "nemotron-nas"
    return tmp / "smol llama", tmp / "smol parent"


def smol_child(tmp: Path, seed: int = 5) -> Path:
    """A child of SmolLM2-135M-Instruct's shapes: 3 / 1 / 3 KV heads, FFN 1280 / no-op / 768 / 256, a no-op
    attention in layer 2 (layer 0 keeps its attention, as vLLM needs)."""
    tok = build_tokenizer()
    hid = SMOL["hidden_size"]
    blocks = [block_config(attention_block(3), ffn_block(1280, hid)),
              block_config(attention_block(9), ffn_block(None, hid, no_op=True)),
              block_config(attention_block(no_op=True), ffn_block(768, hid)),
              block_config(attention_block(3), ffn_block(256, hid))]
    cfg = DeciLMConfig(vocab_size=len(tok), num_hidden_layers=len(blocks), block_configs=blocks, **SMOL,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = randomize(DeciLMForCausalLM(cfg).eval(), seed)
    model.save_pretrained(tmp / "smol child")
    tok.save_pretrained(tmp / "smol child")
    return tmp / "smol child"


def fused(tmp: Path, seed: int = 3) -> dict:
    """An FFN-Fusion result: two attention-free layers (widths 256 and 512, norms away from one) fused into
    one SwiGLU of width 768 (``thinkfast.puzzle.fusion.fuse``), between two attention layers."""
    from thinkfast.puzzle.fusion import fuse

    tok = build_tokenizer()
    none = attention_block(no_op=True)
    blocks = [block_config(attention_block(2), ffn_block(512, H)), block_config(none, ffn_block(256, H)),
              block_config(none, ffn_block(512, H)), block_config(attention_block(1), ffn_block(256, H))]
    cfg = DeciLMConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=len(blocks), num_attention_heads=4,
                       block_configs=blocks, max_position_embeddings=2048, rope_theta=500000.0, rope_scaling=LLAMA3,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.add_(0.3 * torch.rand_like(p))
    child = fuse(model, [[1, 2]])
    assert child.config.num_hidden_layers == 3 and child.model.layers[1].ffn_spec.intermediate_size == 768
    child.save_pretrained(tmp / "fused")
    tok.save_pretrained(tmp / "fused")
    return reference(tmp / "fused", seed)


def run_vllm(tmp: Path, cases: dict) -> subprocess.CompletedProcess:
    """Run RUNNER on ``cases`` in .venv-vllm (its results land in tmp/out.json)."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "runner.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(VLLM_PYTHON), "runner.py", "cases.json", "out.json"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)


needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.is_file(),
                                reason="no .venv-vllm: run scripts/setup_vllm.sh (scripts/test.sh does)")


@needs_vllm
def test_vllm_serves_our_checkpoints(tmp_path):
    smol_llama, smol_converted = smol_parent(tmp_path)
    cases = {"tied": build(tmp_path, "tied", True, 0), "untied": build(tmp_path, "untied", False, 1),
             "puzzle child": reference(puzzle_child(tmp_path), 2), "fused": fused(tmp_path),
             "smol llama": reference(smol_llama, 4), "smol converted": reference(smol_converted, 4),
             "smol child": reference(smol_child(tmp_path), 5)}
    # conversion is exact: the Llama folder (converted on load) and the converted folder are one model to us
    assert cases["smol llama"]["greedy"] == cases["smol converted"]["greedy"]
    res = run_vllm(tmp_path, cases)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    for name, case in cases.items():
        assert got[name]["greedy"] == case["greedy"], name
        diff = max(abs(a - b) for a, b in zip(got[name]["prompt_lp"], case["prompt_lp"]))
        assert diff < 1e-4, (name, diff)


@needs_vllm
def test_vllm_fails_on_an_ffn_before_the_first_attention_as_our_rules_say(tmp_path):
    """The one block layout thinkfast.modeling.engine_rules refuses for vLLM that vLLM's block kinds would suggest it
    loads: if vLLM starts loading it, the rule (and the library's layer-0 restriction) can go."""
    from thinkfast.modeling.engine_rules import problems

    tok = build_tokenizer()
    blocks = [block_config(attention_block(no_op=True), ffn_block(512, H)),
              block_config(attention_block(2), ffn_block(512, H))]
    cfg = DeciLMConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                       block_configs=blocks, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert problems(cfg, "vllm")
    torch.manual_seed(0)
    DeciLMForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    case = {"bad": {"path": str(tmp_path / "m"), "prompt": [1, 2, 3]}}
    res = run_vllm(tmp_path, case)
    assert res.returncode != 0 and "too many values to unpack" in res.stdout + res.stderr


@needs_vllm
def test_costs_measured_in_vllm_drive_the_search(tmp_path, monkeypatch):
    """costs.runtime=vllm: every probe model (the parent, and the parent with one variant in every layer
    it may take) is timed in real vLLM, the per-variant costs follow from the differences, and the search
    runs on them."""
    from thinkfast.artifacts import read_costs
    from thinkfast.modeling.engine_rules import check_engine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    tok = build_tokenizer()
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=H, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "parent")
    tok.save_pretrained(tmp_path / "parent")
    run = tmp_path / "run"
    library.run(library.LibraryConfig(engine="vllm", kv_heads=[], ffn_fractions=[0.3], calibration_rows=2,
                                      bld_steps=1, batch_size=2, seq_len=32, device="cpu"), StageDir(run, "library"),
                Inputs({"parent": tmp_path / "parent"}))
    both = Inputs({"parent": tmp_path / "parent", "library": run / "library" / "library"})
    scores.run(scores.ScoresConfig(rows=2, seq_len=32, batch_size=2, device="cpu"), StageDir(run, "scores"), both)
    m = costs.run(costs.CostsConfig(batch_sizes=[1, 4], prefill_len=32, decode_context=32, warmup=1, repeats=2,
                                    rounds=1, measure="models", runtime="vllm", vllm_python=str(VLLM_PYTHON),
                                    device="cpu"), StageDir(run, "costs"), both)
    data = read_costs(run / "costs" / "costs.json")
    assert data["runtime"] == "vllm" and m["decode_explained@4"] > 0
    built = {p["model"] for p in data["probes"].values()}
    assert built == {"parent", "attention.__no_op__", "ffn.__no_op__", "ffn.ffn_256"}  # 4 models (4 vLLM loads)
    assert all(data["probes"][k]["decode_s"]["4"] > 0 for k in built)
    assert data["probes"]["attention.__no_op__"]["layers"] == 2  # layer 0 keeps its attention
    # the library's no-op is the anchor itself; differences of a model this small are mostly vLLM's own
    # per-step work, so no ordering of the other variants is asserted here
    assert data["attention"]["no_op"]["decode_s"]["1"] == 0.0 and data["ffn"]["no_op"]["prefill_s"]["4"] == 0.0
    search.run(search.SearchConfig(speedup=None, max_params=0.8 * sum(
        x.numel() for x in LlamaForCausalLM.from_pretrained(tmp_path / "parent").parameters()), batch_size=4,
        device="cpu"), StageDir(run, "search"),
               Inputs({**both, "scores": run / "scores" / "scores.json", "costs": run / "costs" / "costs.json"}))
    check_engine(DeciLMConfig.from_pretrained(run / "search" / "model"), "vllm", "the child")


@needs_vllm
def test_the_eval_harness_grades_a_vllm_server_like_the_local_folder(tmp_path):
    """eval.endpoint against real `vllm serve` (its OpenAI-compatible server) on one of our checkpoints: the
    harness's prompts, sent as token ids, come back as the text the local rollout engine writes."""
    import socket
    import time

    import httpx

    from thinkfast.artifacts import write_model_sidecar
    from thinkfast.stages.eval import EvalConfig, evaluate_folder

    build(tmp_path, "m", True, 0)
    folder = tmp_path / "m"
    write_model_sidecar(folder, prompting="chat", made_by="test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    log = open(tmp_path / "vllm.log", "w")
    server = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--port", str(port),
                               "--trust-remote-code"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.time() - t0 < 600, (tmp_path / "vllm.log").read_text()[-4000:]
            time.sleep(1)
        common = dict(model=str(folder), per_cell=2, digits=[1], max_new_tokens=16, on_temperature=0.0,
                      save_samples=2, device="cpu")
        local = evaluate_folder(EvalConfig(**common), folder, tmp_path / "local")
        served = evaluate_folder(EvalConfig(**common, endpoint=f"http://127.0.0.1:{port}/v1"), folder,
                                 tmp_path / "served")
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    for mode in ("on", "off"):
        assert {k: local["modes"][mode][k] for k in ("accuracy", "format_ok", "mean_tokens")} == \
            {k: served["modes"][mode][k] for k in ("accuracy", "format_ok", "mean_tokens")}
    responses = [json.loads(line)["response"] for line in (tmp_path / "local" / "samples.jsonl").open()]
    assert len(set(responses)) > 2
    assert responses == [json.loads(line)["response"] for line in (tmp_path / "served" / "samples.jsonl").open()]


@needs_vllm
def test_eval_in_vllm_grades_like_the_local_engine(tmp_path):
    """eval.engine: vllm (thinkfast.generation.vllm_backend: real vLLM in a worker process, loaded once per model):
    the harness's prompts come back as the text the local rollout engine writes, greedy, float32; the thinking
    budget (a per-step hook) is skipped with a note."""
    from thinkfast.artifacts import write_model_sidecar
    from thinkfast.generation import SamplingParams
    from thinkfast.generation.vllm_backend import VLLMBackend
    from thinkfast.stages.eval import EvalConfig, evaluate_folder

    build(tmp_path, "m", True, 0)
    folder = tmp_path / "m"
    write_model_sidecar(folder, prompting="chat", made_by="test")
    common = dict(model=str(folder), per_cell=2, digits=[1], max_new_tokens=16, on_temperature=0.0,
                  save_samples=2, device="cpu")
    local = evaluate_folder(EvalConfig(**common), folder, tmp_path / "local")
    in_vllm = evaluate_folder(EvalConfig(**common, engine="vllm", vllm_python=str(VLLM_PYTHON), vllm_dtype="float32",
                                         vllm_max_model_len=1024, budgets=[8]), folder, tmp_path / "vllm")
    for mode in ("on", "off"):
        assert {k: local["modes"][mode][k] for k in ("accuracy", "format_ok", "mean_tokens")} == \
            {k: in_vllm["modes"][mode][k] for k in ("accuracy", "format_ok", "mean_tokens")}
    responses = [json.loads(line)["response"] for line in (tmp_path / "local" / "samples.jsonl").open()]
    assert len(set(responses)) > 2
    assert responses == [json.loads(line)["response"] for line in (tmp_path / "vllm" / "samples.jsonl").open()]
    assert any("not in vLLM" in n for n in in_vllm["notes"]) and "budget" not in in_vllm
    with VLLMBackend(folder, python=str(VLLM_PYTHON), dtype="float32", max_model_len=1024) as backend:
        # "on" is sampled at top-p 0.95 with a seed: vLLM's CPU build fails per-request seeds there, the worker omits them
        sampled = backend.generate([[1, 2, 3]] * 2, SamplingParams(max_new_tokens=4, temperature=0.6, top_p=0.95, seed=1))
        assert [len(c.token_ids) for c in sampled] == [4, 4]
        # the worker reports each finished prompt before its answer: a progress bar, not a silent wait
        reads, backend_read = [], backend._read
        backend._read = lambda progress=None: backend_read(lambda done: (reads.append(done), progress(done)))
        backend.generate([[1, 2, 3]] * 3, SamplingParams(max_new_tokens=4), progress=True)
        assert reads == [1, 2, 3]
        with pytest.raises(ValueError, match="hook"):
            backend.generate([[1, 2]], SamplingParams(max_new_tokens=2), hook=lambda view: None)
        with pytest.raises(ValueError, match="weights"):
            backend.sync(None)


@needs_vllm
def test_a_vllm_worker_that_dies_is_one_line_naming_its_cause(tmp_path):
    from thinkfast.generation import SamplingParams
    from thinkfast.generation.vllm_backend import VLLMBackend

    backend = VLLMBackend(tmp_path / "no-model", python=str(VLLM_PYTHON), max_model_len=64)
    with pytest.raises(RuntimeError) as info:
        backend.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    message = str(info.value)
    assert "\n" not in message and "stopped (exit" in message and "no-model" in message
    assert "Error" in message.partition("): ")[2]  # vLLM's own first error, not a traceback's last line
