"""The smallest pipeline end to end, and the run-directory contract: exact stage dependencies (reuse what
is current, redo what changed, refuse what is stale), `run --from`, outside files, the upgrade rule,
nothing lost on --force or failure, and a readable message for every probed mistake."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import thinkfast
from thinkfast.cli import main
from thinkfast.config import ConfigError
from thinkfast.data import DataConfig
from thinkfast.pipeline import default_config_path, dependents, load_pipeline, run_all, run_stage, status, upstream
from thinkfast.rundir import RunDir, RunDirError, StageConfigMismatch, StageDir
from thinkfast.stages import pretrain

from helpers import snapshot

SMOKE = default_config_path("smoke")
REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "library", "scores", "costs", "search", "eval"]


def smoke(run, *overrides):
    return load_pipeline(SMOKE, [f"run_dir={run}", *overrides])


def marker(run, name) -> dict:
    return json.loads((Path(run) / name / "COMPLETE.json").read_text())


def ids(run) -> dict:
    return {s: marker(run, s)["output_id"] for s in STAGES}


def state(run, name, *overrides) -> str:
    pipe = smoke(run, *overrides)
    with RunDir(pipe.run_dir) as rd:
        return status(pipe, rd, name)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The smoke pipeline, run once; tests work on copies of it."""
    run = tmp_path_factory.mktemp("smoke") / "run"
    results = run_all(smoke(run))
    return run, results


@pytest.fixture
def run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base[0], dst, symlinks=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_repo_configs_are_the_embedded_ones():
    for name in ("nano", "smoke"):
        assert (REPO / "configs" / f"{name}.yaml").read_text() == default_config_path(name).read_text()
        load_pipeline(default_config_path(name))  # every section validates


def test_smoke_pipeline_end_to_end(base):
    run, results = base
    assert sorted(p.name for p in (run / "pretrain").iterdir()) == [
        "COMPLETE.json", "log.jsonl", "metrics.json", "model"]
    assert not list(run.glob("*.partial")) and (run / "thinkfast-run.json").is_file()
    model_files = {p.name for p in (run / "pretrain" / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "thinkfast.json"} <= model_files
    assert results["pretrain"]["train_steps"] == 6 and results["pretrain"]["tokens"] == 6 * 4 * 256
    events = [json.loads(line)["event"] for line in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done" and "train" in events
    model = AutoModelForCausalLM.from_pretrained(run / "pretrain" / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(run / "pretrain" / "model").chat_template

    # Puzzle: library -> scores -> costs -> search, and the child is a nemotron-nas model with the tokenizer
    assert {p.name for p in (run / "library" / "library").iterdir()} == {"library.json", "weights.safetensors"}
    assert (run / "scores" / "scores.json").is_file() and (run / "costs" / "costs.json").is_file()
    assert {"architecture.txt", "search.json", "pareto.json", "pareto.md", "model"} <= {
        p.name for p in (run / "search").iterdir()}
    assert results["search"]["params"] <= 28000 and results["search"]["optimal"]
    child = AutoModelForCausalLM.from_pretrained(run / "search" / "model")
    assert type(child).__name__ == "DeciLMForCausalLM"
    assert json.loads((run / "search" / "model" / "thinkfast.json").read_text())["prompting"] == "text"

    # eval is a leaf that evaluated every model of the run: one folder each, one table with a row per model
    ev = results["eval"]["models"]
    assert set(ev) == {"pretrain", "search"}
    for name in ev:
        assert ev[name]["prompting"] == "text" and set(ev[name]["modes"]) == {"think", "direct"}
        assert ev[name]["modes"]["think"]["cells"]["add/1d"]["n"] == 4
        assert {"metrics.json", "samples.jsonl", "table.txt", "record.json"} <= {
            p.name for p in (run / "eval" / name).iterdir()}
    table = (run / "eval" / "table.txt").read_text().splitlines()
    assert sum(line.startswith("pretrain") for line in table) == 2 and sum(
        line.startswith("search") for line in table) == 2
    # the marker records what the stage read, by role
    m = marker(run, "search")
    assert m["format"] == 2 and set(m["inputs"]) == {"parent", "library", "scores", "costs"}
    assert m["inputs"]["library"] == {"stage": "library", "id": marker(run, "library")["output_id"]}
    assert set(marker(run, "eval")["inputs"]["models"]) == {"pretrain", "search"}


def test_a_second_run_reuses_everything(run):
    before = {s: (run / s / "COMPLETE.json").read_text() for s in STAGES}
    again = run_all(smoke(run))
    assert {s: (run / s / "COMPLETE.json").read_text() for s in STAGES} == before
    assert again["pretrain"]["train_steps"] == 6


def test_dependencies_are_declared_by_role():
    pipe = smoke("unused")
    assert upstream(pipe, "pretrain") == []
    assert upstream(pipe, "library") == ["pretrain"]
    assert upstream(pipe, "search") == ["pretrain", "library", "scores", "costs"]
    assert upstream(pipe, "eval") == ["pretrain", "search"]
    assert dependents(pipe, "library") == ["scores", "costs", "search", "eval"]
    assert dependents(pipe, "eval") == [] and dependents(pipe, "costs") == ["search", "eval"]
    # an outside file replaces the stage that would have made it
    assert upstream(smoke("unused", "search.costs=/x/costs.json"), "search") == ["pretrain", "library", "scores"]


def test_redone_parent_never_mixes_with_old_layers(run):
    """Issue reproduction 1: pretrain redone with another seed, library redone, then search alone."""
    run_stage(smoke(run, "pretrain.seed=7"), "pretrain", force=True)
    assert state(run, "library") == "stale"  # its parent was redone
    # library reads only the parent; running it redoes it (the parent changed) without asking for --force
    _, ran = run_stage(smoke(run, "pretrain.seed=7"), "library")
    assert ran
    # search reads scores and costs, still made from the old parent: refused, naming what to run
    with pytest.raises(StageConfigMismatch, match=r"stage 'scores'.*out of date.*input 'parent'.*redone"):
        run_stage(smoke(run, "pretrain.seed=7"), "search", force=True)
    run_all(smoke(run, "pretrain.seed=7"))
    parent = load_file(run / "pretrain" / "model" / "model.safetensors")
    child = load_file(run / "search" / "model" / "model.safetensors")
    assert torch.equal(parent["model.embed_tokens.weight"], child["model.embed_tokens.weight"])
    m = marker(run, "search")
    assert m["inputs"]["parent"]["id"] == marker(run, "pretrain")["output_id"]
    assert m["inputs"]["library"]["id"] == marker(run, "library")["output_id"]


def test_redone_library_makes_search_stale(run):
    """Issue reproduction 2: library forced with another bld_steps; the old search is not reported complete."""
    run_stage(smoke(run, "library.bld_steps=8"), "library", force=True)
    assert state(run, "search", "library.bld_steps=8") == "stale"
    with pytest.raises(StageConfigMismatch, match="stage 'scores'.*out of date"):
        run_stage(smoke(run, "library.bld_steps=8"), "search")
    # without the override the config says bld_steps=4: the library itself is out of date, and says why
    with pytest.raises(StageConfigMismatch, match=r"library.bld_steps changed: 8 -> 4"):
        run_stage(smoke(run), "scores")


def test_redoing_eval_leaves_every_other_stage_current(run):
    before = ids(run)
    run_stage(smoke(run), "eval", force=True)
    after = ids(run)
    assert {s: after[s] == before[s] for s in STAGES} == {s: s != "eval" for s in STAGES}
    for s in STAGES:
        assert state(run, s) == "complete"


def test_run_from_redoes_a_stage_and_exactly_its_dependents(run, capsys):
    before = ids(run)
    run_all(smoke(run), from_stage="costs")
    after = ids(run)
    assert [s for s in STAGES if after[s] != before[s]] == ["costs", "search", "eval"]
    # eval re-used its evaluation of the unchanged parent and evaluated only the new child
    out = capsys.readouterr().out
    assert "pretrain: reusing the evaluation" in out and "search: reusing" not in out
    with pytest.raises(ConfigError, match="--from nope"):
        run_all(smoke(run), from_stage="nope")


def test_a_changed_stage_is_redone_and_so_is_what_reads_it(run):
    before = ids(run)
    run_all(smoke(run, "search.max_params=30000"))
    after = ids(run)
    assert [s for s in STAGES if after[s] != before[s]] == ["search", "eval"]


def test_outside_costs_file_is_identified_by_content(run, tmp_path):
    own = tmp_path / "own-costs.json"
    shutil.copy(run / "costs" / "costs.json", own)
    run_stage(smoke(run, f"costs.file={own}"), "costs")
    assert marker(run, "costs")["inputs"]["file"]["path"] == str(own.resolve())
    assert state(run, "costs", f"costs.file={own}") == "complete"
    data = json.loads(own.read_text())
    data["device"] = "cuda: measured elsewhere"
    own.write_text(json.dumps(data))
    pipe = smoke(run, f"costs.file={own}")
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "costs")
    assert st == "stale" and any("changed since this stage ran" in r for r in reasons)
    metrics, ran = run_stage(pipe, "costs")
    assert ran and metrics["device"] == "cuda: measured elsewhere"


def test_eval_model_outside_the_run_is_identified_by_content(run, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(run / "pretrain" / "model", model)
    out = tmp_path / "ev"
    args = ["eval", "--config", str(SMOKE), "--model", str(model), "--out", str(out), "eval.per_cell=2"]
    assert main(args) == 0
    first = marker(out, "eval")["output_id"]
    assert main(args) == 0 and marker(out, "eval")["output_id"] == first  # unchanged model: reused
    # the model is re-made (here: another parent's weights): the old result is not reused
    shutil.copy(run / "search" / "model" / "config.json", model / "config.json")
    shutil.copy(run / "search" / "model" / "model.safetensors", model / "model.safetensors")
    assert main(args) == 0 and marker(out, "eval")["output_id"] != first


def test_upgrade_rule_keeps_finished_work(run):
    """A config key the marker lacks (a field added later) counts as unchanged while it holds its default."""
    path = run / "pretrain" / "COMPLETE.json"
    m = json.loads(path.read_text())
    assert m["config"]["data.fact_fraction"] == 0.0  # the default
    del m["config"]["data.fact_fraction"]
    m["config"]["a_field_removed_since"] = 3  # unknown to the code now: ignored
    path.write_text(json.dumps(m))
    assert state(run, "pretrain") == "complete"
    _, ran = run_stage(smoke(run), "pretrain")
    assert not ran
    # the same missing key holding a non-default value now is a change, and says so
    pipe = smoke(run, "data.fact_fraction=0.1")
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "pretrain")
    assert st == "stale" and reasons == [
        "data.fact_fraction changed: 0.0 (as before the field existed) -> 0.1"]


def test_a_parent_made_before_the_data_section_is_kept(run):
    """The nano mix moved from pretrain's section to data: a marker holding it under its old name still
    describes the parent, and a change of the mix is named by its new key."""
    path = run / "pretrain" / "COMPLETE.json"
    m = json.loads(path.read_text())
    m["config"] = {k.removeprefix("data."): v for k, v in m["config"].items()}  # as pretrain wrote it
    path.write_text(json.dumps(m))
    assert state(run, "pretrain") == "complete"
    pipe = smoke(run, "data.digits=[1,2]")
    with RunDir(pipe.run_dir) as rd:
        assert status(pipe, rd, "pretrain") == ("stale", ["data.digits changed: [1] -> [1, 2]"])
    with pytest.raises(ConfigError, match="line .*'pretrain.kinds' moved to 'data.kinds'"):
        bad = run.parent / "old.yaml"
        bad.write_text("pretrain:\n  kinds: [add]\n")
        load_pipeline(bad)


def _make_legacy(run, order=("pretrain", "eval", "library", "scores", "costs", "search")):
    """Rewrite the markers as the thinkfast before recorded inputs wrote them (hash of config + the
    marker of the stage listed just before), in that version's stage order."""
    from thinkfast.config import config_hash, to_dict
    from thinkfast.pipeline import _NOT_IN_HASH

    pipe, upstream_ = smoke(run), None
    for i, name in enumerate(order):
        cfg = {k: v for k, v in to_dict(pipe.configs[name]).items() if k not in _NOT_IN_HASH}
        if name == "pretrain":  # the nano mix was pretrain's own then
            cfg.update(pipe.data.mix())
        h = config_hash({"stage": name, "config": cfg, "upstream": upstream_})
        m = {"stage": name, "config_hash": h, "finished_at": f"2026-11-0{i + 1}T00:00:00",
             "metrics": marker(run, name)["metrics"]}
        (run / name / "COMPLETE.json").write_text(json.dumps(m))
        upstream_ = [h, m["finished_at"]]


def test_a_run_finished_by_an_older_thinkfast_is_kept(run):
    _make_legacy(run)
    weights = (run / "search" / "model" / "model.safetensors").read_bytes()
    run_all(smoke(run))
    for name in ("pretrain", "library", "scores", "costs", "search"):
        m = marker(run, name)
        assert m["format"] == 2 and m["output_id"].startswith("legacy-") and m["legacy_config_hash"], name
    assert (run / "search" / "model" / "model.safetensors").read_bytes() == weights
    assert not marker(run, "eval")["output_id"].startswith("legacy-")  # eval now evaluates every model
    assert set(marker(run, "eval")["inputs"]["models"]) == {"pretrain", "search"}


def test_an_older_stage_whose_config_changed_is_redone_with_what_follows(run):
    _make_legacy(run)
    run_all(smoke(run, "scores.rows=3"))
    kept = {s: marker(run, s)["output_id"].startswith("legacy-") for s in STAGES}
    assert kept == {"pretrain": True, "library": True, "scores": False, "costs": True, "search": False,
                    "eval": False}


def test_force_then_fail_keeps_the_old_output_whole(run, monkeypatch):
    before = snapshot(run / "search")
    # a bad value: refused when the config loads, nothing touched
    with pytest.raises(ConfigError, match="device='tpu'"):
        run_stage(smoke(run, "pretrain.device=tpu"), "pretrain", force=True)
    # a value that fails inside the stage: the old output stays whole, nothing mixed in
    with pytest.raises(ConfigError, match="batch_size=7"):
        run_stage(smoke(run, "search.batch_size=7"), "search", force=True)
    assert snapshot(run / "search") == before and (run / "pretrain" / "model" / "model.safetensors").is_file()

    from thinkfast.stages import search

    def boom(*a, **k):
        raise RuntimeError("disk trouble while writing the Pareto table")

    monkeypatch.setattr(search, "_pareto", boom)  # after model/ and architecture.txt of the new run
    with pytest.raises(RuntimeError):
        run_stage(smoke(run, "search.max_params=30000"), "search", force=True)
    assert snapshot(run / "search") == before
    assert state(run, "search") == "complete"  # the old output still matches the YAML
    monkeypatch.undo()
    # completing without a sweep replaces the whole folder: no pareto.* of the old run survives
    run_stage(smoke(run, "search.sweep=[]"), "search")
    assert not list((run / "search").glob("pareto*")) and not (run / "search.partial").exists()


def test_interrupted_pretrain_resumes_to_the_same_weights(base, tmp_path, monkeypatch):
    ref = load_file(base[0] / "pretrain" / "model" / "model.safetensors")
    real_make_batch = pretrain.make_batch

    def failing(cfg, data, tok, step):
        if step == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return real_make_batch(cfg, data, tok, step)

    run = tmp_path / "run"
    monkeypatch.setattr(pretrain, "make_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stage(smoke(run), "pretrain")
    work = StageDir(run, "pretrain.partial")
    assert not (run / "pretrain").exists() and (work.checkpoint_dir / "state.json").is_file()
    assert not list(work.checkpoint_dir.glob("*.pt"))  # no pickle
    assert state(run, "pretrain") == "partial"
    monkeypatch.setattr(pretrain, "make_batch", real_make_batch)
    metrics, ran = run_stage(smoke(run), "pretrain")
    assert ran and not work.path.exists() and not (run / "pretrain" / "checkpoint").exists()
    got = load_file(run / "pretrain" / "model" / "model.safetensors")
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k
    starts = [json.loads(x) for x in (run / "pretrain" / "log.jsonl").read_text().splitlines() if '"start"' in x]
    assert [s["resume_step"] for s in starts] == [0, 3]


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = pretrain.make_batch

    def stop(cfg, data, tok, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(cfg, data, tok, step)

    monkeypatch.setattr(pretrain, "make_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        run_stage(smoke(run), "pretrain")
    monkeypatch.undo()
    ckpt = run / "pretrain.partial" / "checkpoint"
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    flag = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (flag,))

    import pickle

    (ckpt / "state.pt").write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(ConfigError, match=r"state.pt is a pickle.*--force"):
        run_stage(smoke(run), "pretrain")
    assert not flag.exists()


def test_stage_order_and_values_fail_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"'library' reads a model \(parent\) but no stage before it makes one"):
        smoke(tmp_path, "stages=[library,pretrain]")
    with pytest.raises(ConfigError, match="run_dir is empty"):
        load_pipeline(SMOKE, ["run_dir="])
    with pytest.raises(ConfigError, match="override pretrain.num_heads=0"):
        smoke(tmp_path, "pretrain.num_heads=0")
    with pytest.raises(ConfigError, match="hidden_size=-8 must be >= 1"):
        smoke(tmp_path, "pretrain.hidden_size=-8")
    with pytest.raises(ConfigError, match="device='tpu'"):
        smoke(tmp_path, "eval.device=tpu")
    if not torch.cuda.is_available():
        pipe = smoke(tmp_path / "r", "costs.device=cuda")
        with pytest.raises(ConfigError, match="override costs.device=cuda: device='cuda', but this machine has no CUDA"):
            run_all(pipe)
        assert not (tmp_path / "r").exists()  # refused before any stage started


def test_run_directory_must_be_unambiguous_and_is_never_someone_elses(tmp_path):
    mine = tmp_path / "mine"
    (mine / "eval" / "model").mkdir(parents=True)
    (mine / "eval" / "model" / "weights.bin").write_bytes(b"user data")
    with pytest.raises(RunDirError, match="not a thinkfast run directory"):
        run_stage(smoke(mine), "pretrain")
    assert (mine / "eval" / "model" / "weights.bin").read_bytes() == b"user data"
    assert sorted(p.name for p in mine.iterdir()) == ["eval"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        run_stage(smoke(afile), "pretrain")


def test_a_locked_run_directory_is_refused(run, capsys):
    holder = RunDir(run, command="thinkfast run (other terminal)")
    holder.prepare()
    holder.lock()
    try:
        assert main(["run", "--config", str(SMOKE), f"run_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert "is in use by pid" in err and "other terminal" in err
    finally:
        holder.unlock()
    assert main(["run", "--config", str(SMOKE), f"run_dir={run}"]) == 0


def test_cli_runs_and_reports_errors(run, tmp_path, capsys):
    model = run / "pretrain" / "model"
    assert main(["convert", str(model), str(tmp_path / "nas")]) == 0
    assert json.loads((tmp_path / "nas" / "config.json").read_text())["model_type"] == "nemotron-nas"
    assert json.loads((tmp_path / "nas" / "thinkfast.json").read_text())["prompting"] == "text"
    capsys.readouterr()

    def err(args) -> tuple[int, str]:
        code = main(args)
        return code, capsys.readouterr().err

    code, msg = err(["run", "--config", str(SMOKE), "pretrain.nope=1"])
    assert code == 2 and "unknown key 'pretrain.nope'" in msg
    code, msg = err(["search", "--config", str(SMOKE), f"run_dir={tmp_path / 'none'}"])
    assert code == 2 and "stage 'pretrain', which has not completed" in msg and "thinkfast pretrain" in msg
    code, msg = err(["pretrain", "--config", str(SMOKE), "pretrain.num_heads=0", f"run_dir={run}"])
    assert code == 2 and "override pretrain.num_heads=0" in msg and "Traceback" not in msg


def test_cli_messages_for_damaged_run_directories(run, capsys):
    def err(*args) -> tuple[int, str]:
        code = main([*args, "--config", str(SMOKE), f"run_dir={run}"])
        return code, capsys.readouterr().err.strip()

    capsys.readouterr()
    (run / "costs" / "COMPLETE.json").write_text("[]")
    code, msg = err("search")
    assert code == 2 and "costs/COMPLETE.json: not a thinkfast marker of stage 'costs'" in msg and "\n" not in msg
    shutil.rmtree(run / "costs")
    # a truncated model file names itself
    weights = run / "pretrain" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, msg = err("library", "--force")
    assert code == 2 and "model.safetensors" in msg and "\n" not in msg
    # a bad config.json names itself
    (run / "pretrain" / "model" / "config.json").write_text("{not json")
    code, msg = err("library", "--force")
    assert code == 2 and "config.json" in msg and "\n" not in msg


def test_cli_interrupt_and_full_disk(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "run", interrupted)
    assert main(["pretrain", "--config", str(SMOKE), f"run_dir={tmp_path / 'r'}"]) == 130
    assert "interrupted" in capsys.readouterr().err

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "pretrain.partial" / "x"))

    monkeypatch.setattr(pretrain, "run", full)
    assert main(["pretrain", "--config", str(SMOKE), f"run_dir={tmp_path / 'r'}"]) == 1
    msg = capsys.readouterr().err
    assert "no space left" in msg and "pretrain.partial" in msg and "Traceback" not in msg
    with pytest.raises(OSError):
        main(["pretrain", "--debug", "--config", str(SMOKE), f"run_dir={tmp_path / 'r'}"])


def test_eval_chat_modes_sample_on_and_greedy_off(run):
    pipe = smoke(run, "stages=[pretrain,eval]", "eval.prompting=chat", "eval.samples=2")
    metrics, _ = run_stage(pipe, "eval")
    m = metrics["models"]["pretrain"]
    assert m["prompting"] == "chat" and set(m["modes"]) == {"on", "off"}
    assert m["modes"]["on"]["cells"]["add/1d"]["n"] == 8  # per_cell x samples
    assert m["modes"]["off"]["cells"]["add/1d"]["n"] == 4  # greedy: one sample
    samples = [json.loads(x) for x in (run / "eval" / "pretrain" / "samples.jsonl").read_text().splitlines()]
    assert {s["mode"] for s in samples} == {"on", "off"}


def test_pretrain_changes_every_parameter_and_batches_are_deterministic():
    cfg = pretrain.PretrainConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48,
                                  batch_size=2, seq_len=64)
    data = DataConfig(digits=[1])
    tok = thinkfast.nano.tokenizer.build_tokenizer()
    a, b = pretrain.make_batch(cfg, data, tok, 5), pretrain.make_batch(cfg, data, tok, 5)
    assert torch.equal(a, b) and not torch.equal(a, pretrain.make_batch(cfg, data, tok, 6))
    assert a.shape == (2, 65)
    assert tok.decode(a[0].tolist()).startswith("Problem: ")  # every row opens a document
    model = pretrain.build_parent(cfg, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pretrain._optimizer(model, cfg)
    out = model(input_ids=a[:, :-1], labels=a[:, :-1])
    out.loss.backward()
    opt.step()
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p)] == []


def test_lr_schedule():
    cfg = pretrain.PretrainConfig(train_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert pretrain.lr_at(cfg, 0) == pytest.approx(0.1)
    assert pretrain.lr_at(cfg, 9) == pytest.approx(1.0)
    assert pretrain.lr_at(cfg, 100) == pytest.approx(0.1)
    assert 0.1 < pretrain.lr_at(cfg, 55) < 1.0


def test_bad_configs_name_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nstages: [pretrain]\npretrain:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line 4: unknown key 'pretrain.hiden_size'.*did you mean 'pretrain.hidden_size'"):
        load_pipeline(bad)
    bad.write_text("stages: [pretrain, finetune]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown stage\(s\) \['finetune'\]"):
        load_pipeline(bad)
    bad.write_text("pretrain:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"line 2: 'pretrain.lr' must be float"):
        load_pipeline(bad)
    bad.write_text("data:\n  kinds: [add, div]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'data'.*unknown kind\(s\) \['div'\]"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="unknown key 'eval.per_cel'"):
        load_pipeline(SMOKE, ["eval.per_cel=3"])


def test_documents_longer_than_a_row_are_measured():
    tok = thinkfast.nano.tokenizer.build_tokenizer()
    short, mul = pretrain.PretrainConfig(seq_len=64), DataConfig(digits=[2], kinds=["mul"], think_fraction=1.0)
    assert pretrain.too_long_fraction(short, mul, tok) == 1.0  # every worked 2-digit product exceeds 64 tokens
    long = pretrain.PretrainConfig(seq_len=1024)
    assert pretrain.too_long_fraction(long, DataConfig(digits=[1, 2]), tok) == 0.0


def test_costs_measured_on_another_device_are_not_reused(run, monkeypatch):
    from thinkfast.stages import costs

    assert state(run, "costs") == "complete"
    monkeypatch.setattr(costs, "device_name", lambda device: "cuda: some GPU")
    pipe = smoke(run)
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "costs")
    assert st == "stale" and "measured on 'cpu" in reasons[0] and "'cuda: some GPU'" in reasons[0]


def test_forced_eval_evaluates_again(run, capsys):
    capsys.readouterr()
    run_all(smoke(run), from_stage="eval")
    out = capsys.readouterr().out
    assert "reusing" not in out and "eval: pretrain: " in out and "eval: search: " in out


def test_a_damaged_marker_is_replaced_by_force(run, capsys):
    (run / "library" / "COMPLETE.json").write_text(json.dumps({"stage": "library", "format": 2, "config": "x"}))
    with pytest.raises(RunDirError, match=r"library/COMPLETE.json: not a thinkfast marker.*--force"):
        run_stage(smoke(run), "scores")
    _, ran = run_stage(smoke(run), "library", force=True)
    assert ran and marker(run, "library")["format"] == 2


def test_paths_in_the_config_are_checked_before_any_stage_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"override eval.model=/no/such/model: /no/such/model does not exist"):
        run_all(smoke(tmp_path / "r", "eval.model=/no/such/model"))
    with pytest.raises(ConfigError, match="is a folder; name the costs file itself"):
        run_all(smoke(tmp_path / "r", f"costs.file={tmp_path}"))
    assert not (tmp_path / "r").exists()


def test_overrides_and_options_mix_on_the_command_line(run, capsys):
    assert main(["search", "search.max_params=30000", "--force", "--config", str(SMOKE), f"run_dir={run}"]) == 0
    assert marker(run, "search")["config"]["max_params"] == 30000


@pytest.mark.parametrize("stage, outcome", [
    ("library", "redone"),  # reads only the parent, which is current: redone without asking
    ("scores", "refused: library"),  # reads the library, made from the old parent
    ("costs", "refused: library"),
    ("search", "refused: library"),
    ("eval", "refused: library"),  # the child is not current; the root cause is named
])
def test_every_single_stage_command_sees_a_redone_parent(run, stage, outcome):
    run_stage(smoke(run, "pretrain.seed=7"), "pretrain", force=True)
    assert state(run, stage, "pretrain.seed=7") == "stale"
    if outcome == "redone":
        assert run_stage(smoke(run, "pretrain.seed=7"), stage)[1]
        assert marker(run, stage)["inputs"]["parent"]["id"] == marker(run, "pretrain")["output_id"]
    else:
        with pytest.raises(StageConfigMismatch, match=f"stage '{outcome.split(': ')[1]}', which is out of date"):
            run_stage(smoke(run, "pretrain.seed=7"), stage)


def test_a_bad_user_costs_file_is_one_line_naming_file_and_field(run, tmp_path, capsys):
    data = json.loads((run / "costs" / "costs.json").read_text())
    del data["ffn"][next(iter(data["ffn"]))]["params"]
    own = tmp_path / "mine.json"
    own.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["costs", "--config", str(SMOKE), f"run_dir={run}", f"costs.file={own}"]) == 2
    msg = capsys.readouterr().err.strip()
    assert str(own) in msg and ".params" in msg and "\n" not in msg


def test_a_new_field_whose_default_changes_behaviour_keeps_old_work(run):
    """library.engine defaults to vllm, but a library made before the field existed was unrestricted
    (as with hf): such a marker stays complete while the config says hf, and is redone for vllm."""
    path = run / "library" / "COMPLETE.json"
    m = json.loads(path.read_text())
    assert m["config"].pop("engine") == "hf"
    path.write_text(json.dumps(m))
    assert state(run, "library") == "complete"
    pipe = smoke(run, "library.engine=vllm")
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "library")
    assert st == "stale" and reasons == ["library.engine changed: 'hf' (as before the field existed) -> 'vllm'"]


def test_pretrain_easy_steps_draw_small_numbers_first():
    import re

    from thinkfast.data import DataConfig
    from thinkfast.nano.tokenizer import build_tokenizer
    from thinkfast.stages.pretrain import PretrainConfig, make_batch

    tok = build_tokenizer()
    cfg = PretrainConfig(easy_steps=2, batch_size=2, seq_len=256)
    data = DataConfig(kinds=["add"], digits=[3], think_fraction=0.0)
    early = tok.batch_decode(make_batch(cfg, data, tok, 1))
    late = tok.batch_decode(make_batch(cfg, data, tok, 2))
    questions = lambda rows: [q for r in rows for q in re.findall(r"Problem: (\d+) \+ (\d+)", r)]  # noqa: E731
    assert questions(early) and all(len(a) == 1 and len(b) == 1 for a, b in questions(early))
    assert questions(late) and all(len(a) == 3 for a, _ in questions(late))
    with pytest.raises(ValueError, match="easy_digits"):
        PretrainConfig(easy_digits=[])
