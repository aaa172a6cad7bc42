"""The command line and the config: every probed mistake is one readable line naming the file, line, key or
value at fault; run directories that are ambiguous, locked or planted are refused."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import marker, smoke

from thinkfast.cli import main
from thinkfast.config import ConfigError
from thinkfast.pipeline import default_config_path, load_pipeline, run_all, run_stage
from thinkfast.rundir import RunDir, RunDirError
from thinkfast.stages import pretrain

SMOKE = default_config_path("smoke")


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


def test_overrides_and_options_mix_on_the_command_line(run, capsys):
    assert main(["search", "search.max_params=30000", "--force", "--config", str(SMOKE), f"run_dir={run}"]) == 0
    assert marker(run, "search")["config"]["max_params"] == 30000


def test_a_bad_user_costs_file_is_one_line_naming_file_and_field(run, tmp_path, capsys):
    data = json.loads((run / "costs" / "costs.json").read_text())
    del data["ffn"][next(iter(data["ffn"]))]["params"]
    own = tmp_path / "mine.json"
    own.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["costs", "--config", str(SMOKE), f"run_dir={run}", f"costs.file={own}"]) == 2
    msg = capsys.readouterr().err.strip()
    assert str(own) in msg and ".params" in msg and "\n" not in msg


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


def test_paths_in_the_config_are_checked_before_any_stage_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"override eval.model=/no/such/model: /no/such/model does not exist"):
        run_all(smoke(tmp_path / "r", "eval.model=/no/such/model"))
    with pytest.raises(ConfigError, match="is a folder; name the costs file itself"):
        run_all(smoke(tmp_path / "r", f"costs.file={tmp_path}"))
    assert not (tmp_path / "r").exists()


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

