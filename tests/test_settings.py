"""The config field groups the training stages inherit (thinkfast.train.settings): flat keys, one validation
naming the key, each stage's own defaults, and stage identities as they were before the groups."""

from __future__ import annotations

import dataclasses

import pytest

from thinkfast.config import ConfigError, config_hash, from_dict
from thinkfast.stages import distill, grpo, library, pretrain, sft
from thinkfast.train.settings import CadenceFields, OptimizerFields, PeriodicEvalFields, RolloutSampling

STAGES = {"pretrain": pretrain.Config, "distill": distill.Config, "sft": sft.Config, "grpo": grpo.Config,
          "library": library.Config}


# fields added since 27da51a: at their defaults a completed stage stays current (rundir.describe_changes)
ADDED_SINCE = {"sft": ("if_prompts", "phrasing", "off_prompts", "off_digits", "off_steps", "held_out_rows",
                       "eval_files"), "grpo": ("phrasing", "covered_digits", "covered_steps", "reinforce",
                                                            "unsolved_per_step", "unsolved_order",
                                                            "malformed_share")}


def _without_added(name: str, cfg) -> dict:
    out = dataclasses.asdict(cfg)
    for key in ADDED_SINCE.get(name, ()):
        out.pop(key)
    return out


def test_default_configs_hash_as_before_the_groups():
    """config_hash of each stage's default config, as computed at 27da51a (each stage declaring every field
    itself): moving fields into the groups kept every name, type and default."""
    assert {name: config_hash(_without_added(name, cls())) for name, cls in STAGES.items()} == {
        "distill": "68b94d8648c1a6a4", "grpo": "7c0f456f343a630a", "library": "fda319c9f18309cd",
        "pretrain": "5b0050ecd0c934f0", "sft": "95735fe6de5fdbc6"}


def test_each_stage_keeps_its_own_defaults():
    p, d, s, g, lib = (cls() for cls in STAGES.values())
    assert (p.lr, p.warmup_steps, p.weight_decay, p.checkpoint_every, p.log_every) == (4e-3, 100, 0.1, 100, 10)
    assert (d.lr, d.eval_every, d.eval_problems, d.checkpoint_every) == (1e-3, 50, 40, 50)
    assert (s.lr, s.eval_every, s.eval_problems, s.eval_max_new_tokens) == (1e-3, 100, 40, 600)
    assert (g.lr, g.warmup_steps, g.min_lr_ratio, g.precision, g.batch_size, g.max_new_tokens) == (
        1e-4, 0, 1.0, "fp32", 64, 512)
    assert (g.eval_every, g.eval_problems, g.checkpoint_every, g.log_every) == (20, 60, 10, 1)
    assert (lib.lr, lib.checkpoint_every, lib.log_every) == (1e-3, 50, 10)
    assert isinstance(g, (RolloutSampling, OptimizerFields, PeriodicEvalFields, CadenceFields))
    assert isinstance(lib, CadenceFields) and not isinstance(lib, OptimizerFields)


@pytest.mark.parametrize("stage, key, value, message", [
    ("pretrain", "lr", 0.0, "lr=0.0 must be > 0"),
    ("sft", "grad_clip", -1.0, "grad_clip=-1.0 must be > 0"),
    ("distill", "weight_decay", -0.1, "weight_decay=-0.1 must be >= 0"),
    ("grpo", "min_lr_ratio", 1.5, r"min_lr_ratio=1.5 must be in \[0, 1\]"),
    ("sft", "warmup_steps", -1, "warmup_steps=-1 must be >= 0"),
    ("library", "checkpoint_every", 0, "checkpoint_every=0 must be >= 1"),
    ("grpo", "log_every", 0, "log_every=0 must be >= 1"),
    ("distill", "eval_every", 0, "eval_every=0 must be >= 1"),
    ("sft", "eval_problems", -2, "eval_problems=-2 must be >= 0"),
    ("grpo", "eval_max_new_tokens", 0, "eval_max_new_tokens=0 must be >= 1"),
    ("grpo", "top_p", 0.0, r"top_p=0.0 must be in \(0, 1\]"),
    ("grpo", "temperature", 0.0, "temperature=0.0 must be > 0"),
    ("grpo", "batch_size", 0, "batch_size=0 must be >= 1"),
])
def test_one_validation_names_the_key_in_every_stage(stage, key, value, message):
    with pytest.raises(ConfigError, match=rf"^cfg.yaml line 2: invalid section '{stage}': {message}$"):
        from_dict(STAGES[stage], {key: value}, where="cfg.yaml", lines={stage: 2, f"{stage}.{key}": 3},
                  prefix=stage)


def test_grouped_keys_stay_flat_in_the_yaml_with_types_and_unknown_keys_checked():
    cfg = from_dict(grpo.Config, {"lr": 1e-3, "top_p": 0.9, "eval_every": 5, "log_every": 2}, where="c.yaml",
                    prefix="grpo")
    assert (cfg.lr, cfg.top_p, cfg.eval_every, cfg.log_every, cfg.group_size) == (1e-3, 0.9, 5, 2, 8)
    with pytest.raises(ConfigError, match=r"^c.yaml: 'sft.lr' must be float, got str \('fast'\)$"):
        from_dict(sft.Config, {"lr": "fast"}, where="c.yaml", prefix="sft")
    with pytest.raises(ConfigError, match=r"'pretrain.precision' must be one of 'auto', 'bf16', 'fp32'"):
        from_dict(pretrain.Config, {"precision": "fp16"}, where="c.yaml", prefix="pretrain")
    with pytest.raises(ConfigError, match=r"unknown key 'sft.warmup'.*did you mean 'sft.warmup_steps'") as e:
        from_dict(sft.Config, {"warmup": 3}, where="c.yaml", prefix="sft")
    known = str(e.value).split("(known keys: ")[1].split(")")[0].split(", ")
    assert set(known) == {f.name for f in dataclasses.fields(sft.Config)}
    assert {"lr", "eval_every", "checkpoint_every", "files", "device"} <= set(known)
