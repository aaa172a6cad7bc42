"""Tests for thinkfast.config: YAML loading, overrides, dataclass building, hashing."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from thinkfast.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    from_dict,
    load_yaml,
    override_locations,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, ...] = (0.9, 0.95)


@dataclass
class Pretrain:
    model: str
    steps: int = 100
    optim: Optim = field(default_factory=Optim)
    out: Path = Path("out")
    init: Optional[Path] = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    weights: dict[str, float] = field(default_factory=dict)
    dtype: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False
    warmup: int | None = None
    shape: tuple[int, int] = (1, 2)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")


@dataclass
class Pipeline:
    pretrain: Pretrain
    stages: list[str] = field(default_factory=lambda: ["pretrain"])


def write(tmp_path: Path, text: str, name: str = "nano.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


NANO = """
stages: [pretrain, eval]
pretrain:
  model: tiny
  steps: 10
  optim:
    lr: 1e-3
    betas: [0.8, 0.9]
  sizes:
    - 4
    - 8
"""


# ------------------------------------------------------------------ load_yaml


def test_load_yaml_values_and_lines(tmp_path):
    data, lines = load_yaml(write(tmp_path, NANO))
    assert data["pretrain"]["optim"]["lr"] == 1e-3
    assert isinstance(data["pretrain"]["optim"]["lr"], float)
    assert lines["stages"] == 1
    assert lines["pretrain"] == 2
    assert lines["pretrain.model"] == 3
    assert lines["pretrain.optim.lr"] == 6
    assert lines["pretrain.sizes"] == 8
    assert lines["pretrain.sizes[1]"] == 10


@pytest.mark.parametrize(
    "text,expected",
    [("1e-3", 1e-3), ("3e4", 3e4), ("-2.5e-2", -2.5e-2), ("1.5e3", 1500.0), ("+1E5", 1e5)],
)
def test_exponent_floats_load_as_float(tmp_path, text, expected):
    data, _ = load_yaml(write(tmp_path, f"x: {text}\n"))
    assert data["x"] == expected and isinstance(data["x"], float)


def test_plain_yaml_types_unchanged(tmp_path):
    data, _ = load_yaml(write(tmp_path, "a: 12\nb: '1e-3'\nc: 0.5\nd: true\ne: null\nf: abc\n"))
    assert data == {"a": 12, "b": "1e-3", "c": 0.5, "d": True, "e": None, "f": "abc"}
    # the global SafeLoader is not modified
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_load_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n", name="bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_yaml(p)
    msg = str(e.value)
    assert str(p) in msg and "YAML syntax error" in msg
    assert " line 3" in msg


def test_load_yaml_bad_indentation_line(tmp_path):
    p = write(tmp_path, "a:\n  b: 1\n c: 2\n", name="bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml line 3: YAML syntax error"):
        load_yaml(p)


def test_load_yaml_top_level_not_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(ConfigError, match=r"list\.yaml line 1: top level must be a mapping.*got list"):
        load_yaml(p)


def test_load_yaml_empty_file(tmp_path):
    assert load_yaml(write(tmp_path, "# nothing\n")) == ({}, {})


def test_load_yaml_duplicate_key(tmp_path):
    p = write(tmp_path, "pretrain:\n  lr: 1\n  lr: 2\n", name="dup.yaml")
    with pytest.raises(ConfigError, match=r"dup\.yaml line 3: duplicate key 'pretrain\.lr' \(first at line 2\)"):
        load_yaml(p)


# ------------------------------------------------------------ apply_overrides


def test_overrides_parse_values():
    cfg = {"pretrain": {"optim": {"lr": 0.1}, "model": "tiny"}}
    out = apply_overrides(
        cfg,
        [
            "pretrain.optim.lr=1e-3",
            "pretrain.steps=3e4",
            "pretrain.sizes=[1,2]",
            "pretrain.init=null",
            "pretrain.model=small",
            "pretrain.compile=true",
            "pretrain.name=",
            "pretrain.eq=a=b",
            "new.section.key=5",
        ],
    )
    p = out["pretrain"]
    assert p["optim"]["lr"] == 1e-3 and isinstance(p["optim"]["lr"], float)
    assert p["steps"] == 3e4 and isinstance(p["steps"], float)
    assert p["sizes"] == [1, 2]
    assert p["init"] is None and "init" in p
    assert p["model"] == "small"
    assert p["compile"] is True
    assert p["name"] == ""
    assert p["eq"] == "a=b"
    assert out["new"] == {"section": {"key": 5}}
    # input not mutated
    assert cfg == {"pretrain": {"optim": {"lr": 0.1}, "model": "tiny"}}


@pytest.mark.parametrize("bad", ["pretrain.lr", "=3", " =3", "a..b=1", ".a=1", "a.=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [bad])
    assert str(e.value) == f"command line: malformed override {bad!r} (expected dotted.key=value)"


def test_override_into_scalar_is_error():
    with pytest.raises(ConfigError, match=r"args: override 'a\.b=1': 'a' is a int, not a section"):
        apply_overrides({"a": 3}, ["a.b=1"], source="args")


def test_override_unparseable_value():
    with pytest.raises(ConfigError, match=r"command line: cannot parse value of override 'a=\[1,2'"):
        apply_overrides({}, ["a=[1,2"])


# ------------------------------------------------------------------ from_dict


def build(tmp_path, text, overrides=()):
    p = write(tmp_path, text)
    data, lines = load_yaml(p)
    data = apply_overrides(data, list(overrides))
    return p, from_dict(Pipeline, data, where=str(p), lines=lines)


def test_from_dict_nested(tmp_path):
    _, cfg = build(tmp_path, NANO, ["pretrain.init=ckpt/x", "pretrain.weights={a: 1, b: 0.5}"])
    assert cfg.stages == ["pretrain", "eval"]
    pt = cfg.pretrain
    assert pt.model == "tiny" and pt.steps == 10
    assert pt.optim == Optim(lr=1e-3, betas=(0.8, 0.9))
    assert pt.sizes == [4, 8]
    assert pt.init == Path("ckpt/x") and isinstance(pt.init, Path)
    assert pt.weights == {"a": 1.0, "b": 0.5} and isinstance(pt.weights["a"], float)
    assert pt.out == Path("out") and pt.dtype == "bf16"


def test_int_accepted_for_float(tmp_path):
    _, cfg = build(tmp_path, "pretrain:\n  model: m\n  optim:\n    lr: 1\n")
    assert cfg.pretrain.optim.lr == 1.0 and isinstance(cfg.pretrain.optim.lr, float)


def test_unknown_key_with_line_and_suggestion(tmp_path):
    text = "pretrain:\n  model: m\n  optim:\n    lrr: 0.1\n"
    with pytest.raises(ConfigError) as e:
        build(tmp_path, text)
    p = tmp_path / "nano.yaml"
    assert str(e.value) == (
        f"{p} line 4: unknown key 'pretrain.optim.lrr' (known keys: lr, betas); "
        f"did you mean 'pretrain.optim.lr'?"
    )


def test_unknown_key_without_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, "pretrain:\n  model: m\nzzz: 1\n")
    assert str(e.value) == f"{tmp_path / 'nano.yaml'} line 3: unknown key 'zzz' (known keys: pretrain, stages)"


def test_unknown_key_from_override(tmp_path):
    with pytest.raises(ConfigError, match=r"nano\.yaml: unknown key 'pretrain\.stepz'.*did you mean 'pretrain\.steps'"):
        build(tmp_path, NANO, ["pretrain.stepz=3"])


@pytest.mark.parametrize(
    "line,expected",
    [
        ("steps: 1.5", "'pretrain.steps' must be int, got float (1.5)"),
        ("steps: true", "'pretrain.steps' must be int, got bool (True)"),
        ("steps: '10'", "'pretrain.steps' must be int, got str ('10')"),
        ("compile: 1", "'pretrain.compile' must be bool, got int (1)"),
        ("compile: 'yes'", "'pretrain.compile' must be bool, got str ('yes')"),
        ("model: 3", "'pretrain.model' must be str, got int (3)"),
        ("out: 5", "'pretrain.out' must be a path (non-empty str), got int (5)"),
        ("init: [a]", "'pretrain.init' must be Path | null, got list (['a'])"),
        ("warmup: abc", "'pretrain.warmup' must be int | null, got str ('abc')"),
        ("sizes: 3", "'pretrain.sizes' must be list[int], got int (3)"),
        ("weights: [1]", "'pretrain.weights' must be dict[str, float], got list ([1])"),
        ("optim: 3", "section 'pretrain.optim' must be a mapping, got int (3)"),
        ("shape: [1, 2, 3]", "'pretrain.shape' must have 2 items (tuple[int, int]), got 3"),
        ("optim: {lr: x}", "'pretrain.optim.lr' must be float, got str ('x')"),
    ],
)
def test_wrong_types(tmp_path, line, expected):
    model = "model: m" if not line.startswith("model") else "steps: 1"
    with pytest.raises(ConfigError) as e:
        build(tmp_path, f"pretrain:\n  {model}\n  {line}\n")
    assert str(e.value) == f"{tmp_path / 'nano.yaml'} line 3: {expected}"


def test_wrong_list_item_points_at_item_line(tmp_path):
    text = "pretrain:\n  model: m\n  sizes:\n    - 1\n    - two\n"
    with pytest.raises(ConfigError) as e:
        build(tmp_path, text)
    assert str(e.value) == f"{tmp_path / 'nano.yaml'} line 5: 'pretrain.sizes[1]' must be int, got str ('two')"


def test_wrong_tuple_item_and_dict_value(tmp_path):
    with pytest.raises(ConfigError, match=r"line 4: 'pretrain\.optim\.betas\[1\]' must be float, got str"):
        build(tmp_path, "pretrain:\n  model: m\n  optim:\n    betas: [0.9, x]\n")
    with pytest.raises(ConfigError, match=r"line 3: 'pretrain\.weights\.a' must be float, got str"):
        build(tmp_path, "pretrain:\n  model: m\n  weights: {a: x}\n")


def test_literal_error_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, "pretrain:\n  model: m\n  dtype: fp16\n")
    assert str(e.value) == f"{tmp_path / 'nano.yaml'} line 3: 'pretrain.dtype' must be one of 'bf16', 'fp32' (got 'fp16')"


def test_wrong_type_from_override_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"nano\.yaml line 6: 'pretrain\.optim\.lr' must be float, got str \('fast'\)"):
        build(tmp_path, NANO, ["pretrain.optim.lr=fast"])


def test_missing_required(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, "stages: []\npretrain:\n  steps: 3\n")
    assert str(e.value) == f"{tmp_path / 'nano.yaml'} line 2: missing required key(s) 'pretrain.model'"
    with pytest.raises(ConfigError, match=r"nano\.yaml: missing required key\(s\) 'pretrain'$"):
        build(tmp_path, "stages: []\n")


def test_empty_section_means_defaults(tmp_path):
    @dataclass
    class Outer:
        optim: Optim = field(default_factory=Optim)

    assert from_dict(Outer, {"optim": None}, where="x.yaml") == Outer()
    assert from_dict(Outer, None, where="x.yaml") == Outer()


def test_post_init_value_error_becomes_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, "pretrain:\n  model: m\n  steps: 0\n")
    assert str(e.value) == (
        f"{tmp_path / 'nano.yaml'} line 1: invalid section 'pretrain': steps must be > 0, got 0"
    )
    assert isinstance(e.value.__cause__, ValueError)


def test_post_init_top_level_without_lines():
    @dataclass
    class Top:
        n: int = 1

        def __post_init__(self):
            if self.n < 0:
                raise ValueError("n must be >= 0")

    with pytest.raises(ConfigError) as e:
        from_dict(Top, {"n": -1}, where="cfg.yaml")
    assert str(e.value) == "cfg.yaml: invalid top level: n must be >= 0"


def test_from_dict_prefix_and_plain_dict():
    cfg = from_dict(Optim, {"lr": 2}, where="cfg.yaml", prefix="pretrain.optim")
    assert cfg == Optim(lr=2.0)
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: unknown key 'pretrain\.optim\.x'"):
        from_dict(Optim, {"x": 2}, where="cfg.yaml", prefix="pretrain.optim")


def test_from_dict_requires_dataclass():
    with pytest.raises(TypeError):
        from_dict(dict, {}, where="x")


def test_union_of_several_types():
    @dataclass
    class U:
        v: int | str = 0
        o: Optional[Optim] = None

    assert from_dict(U, {"v": "a"}, where="w").v == "a"
    assert from_dict(U, {"v": 3}, where="w").v == 3
    assert from_dict(U, {"o": {"lr": 1}}, where="w").o == Optim(lr=1.0)
    with pytest.raises(ConfigError, match=r"'v' must be int \| str, got list"):
        from_dict(U, {"v": [1]}, where="w")
    with pytest.raises(ConfigError, match=r"unknown key 'o\.lrr'"):
        from_dict(U, {"o": {"lrr": 1}}, where="w")


def test_non_optional_rejects_null(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3: 'pretrain\.steps' must be int, got null"):
        build(tmp_path, "pretrain:\n  model: m\n  steps: null\n")


# -------------------------------------------------------- to_dict / config_hash


def test_to_dict_round_trip(tmp_path):
    _, cfg = build(tmp_path, NANO, ["pretrain.init=a/b"])
    d = to_dict(cfg)
    assert d["pretrain"]["init"] == "a/b"
    assert d["pretrain"]["out"] == "out"
    assert d["pretrain"]["optim"]["betas"] == [0.8, 0.9]
    import json

    json.dumps(d)  # plain JSON-able
    assert from_dict(Pipeline, d, where="x") == cfg


def test_to_dict_skips_non_init_fields():
    @dataclass
    class D:
        a: int = 1
        b: int = dataclasses.field(init=False, default=0)

    assert to_dict(D()) == {"a": 1}


def test_config_hash_stable_and_order_independent():
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    b = {"y": {"a": "s", "b": [1, 2]}, "x": 1}
    h = config_hash(a)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == config_hash(b)
    assert h != config_hash({"x": 2, "y": {"b": [1, 2], "a": "s"}})
    # a dataclass hashes like its dict form, and equal configs hash equal
    cfg = Pipeline(pretrain=Pretrain(model="m"))
    assert config_hash(cfg) == config_hash(to_dict(cfg))
    assert config_hash(cfg) == config_hash(Pipeline(pretrain=Pretrain(model="m")))
    assert config_hash(cfg) != config_hash(Pipeline(pretrain=Pretrain(model="n")))
    # pinned value: the canonical form must not drift between versions
    assert config_hash({"a": 1}) == "015abd7f5cc57a2d"


# ------------------------------------------- errors in overrides name the override


def build_o(tmp_path, text, overrides=()):
    """Like build(), but passes override_locations() as the pipeline loader does."""
    p = write(tmp_path, text)
    data, lines = load_yaml(p)
    data = apply_overrides(data, list(overrides))
    return p, from_dict(Pipeline, data, where=str(p), lines=lines, overridden=override_locations(list(overrides)))


def no_line(msg: str) -> bool:
    return " line " not in msg


def test_override_locations():
    assert override_locations([]) == {}
    assert override_locations(["a.b=1", " c . d =x=y", "e="]) == {"a.b": "a.b=1", "c.d": "c . d =x=y", "e": "e="}
    assert override_locations(["a=1", "b=2", "a=3"]) == {"b": "b=2", "a": "a=3"}  # the last one applied wins
    with pytest.raises(ConfigError, match=r"^command line: malformed override 'a\.b' \(expected dotted\.key=value\)$"):
        override_locations(["a.b"])
    with pytest.raises(ConfigError, match=r"^args: override 3 is not a string"):
        override_locations([3], source="args")


def test_override_value_with_duplicate_key():
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["a={x: 1, x: 2}"])
    assert str(e.value) == "command line: cannot parse value of override 'a={x: 1, x: 2}': duplicate key 'x'"


def test_override_syntax_error_message_is_plain():
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["pretrain.sizes=[1,2"])
    msg = str(e.value)
    assert msg.startswith("command line: cannot parse value of override 'pretrain.sizes=[1,2': YAML syntax error: ")
    assert no_line(msg)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("pretrain.optim.lr=fast", "'pretrain.optim.lr' must be float, got str ('fast')"),
        ("pretrain.steps=1.5", "'pretrain.steps' must be int, got float (1.5)"),
        ("pretrain.steps=-1.5", "'pretrain.steps' must be int, got float (-1.5)"),
        ("pretrain.steps=null", "'pretrain.steps' must be int, got null (None)"),
        ("pretrain.model=3", "'pretrain.model' must be str, got int (3)"),
        ("pretrain.dtype=fp16", "'pretrain.dtype' must be one of 'bf16', 'fp32' (got 'fp16')"),
        ("pretrain.sizes=[4, two]", "'pretrain.sizes[1]' must be int, got str ('two')"),
        ("pretrain.optim={lr: x}", "'pretrain.optim.lr' must be float, got str ('x')"),  # replaced YAML lines 5-7
        ("pretrain.optim.betas=[0.9, x]", "'pretrain.optim.betas[1]' must be float, got str ('x')"),
        ("pretrain.weights={a: x}", "'pretrain.weights.a' must be float, got str ('x')"),
        ("pretrain.shape=[1, 2, 3]", "'pretrain.shape' must have 2 items (tuple[int, int]), got 3"),
        ("pretrain.optim=3", "section 'pretrain.optim' must be a mapping, got int (3)"),
        ("pretrain=[1]", "section 'pretrain' must be a mapping, got list ([1])"),
    ],
)
def test_wrong_type_from_override_names_override(tmp_path, override, expected):
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, NANO, [override])
    assert str(e.value) == f"override {override}: {expected}"


def test_unknown_key_from_override_names_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, NANO, ["pretrain.stepz=3"])
    msg = str(e.value)
    assert msg.startswith("override pretrain.stepz=3: unknown key 'pretrain.stepz' (known keys: ")
    assert msg.endswith("did you mean 'pretrain.steps'?")
    with pytest.raises(ConfigError, match=r"^override pretrain.optim={lrr: 1}: unknown key 'pretrain\.optim\.lrr'"):
        build_o(tmp_path, NANO, ["pretrain.optim={lrr: 1}"])


def test_missing_key_in_section_given_by_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, NANO, ["pretrain={steps: 3}"])
    assert str(e.value) == "override pretrain={steps: 3}: missing required key(s) 'pretrain.model'"


def test_yaml_mistakes_still_name_lines_when_overrides_are_given(tmp_path):
    text = "pretrain:\n  model: m\n  compile: 1\n"
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, text, ["pretrain.optim.lr=0.1", "stages=[a]"])
    assert str(e.value) == f"{tmp_path / 'nano.yaml'} line 3: 'pretrain.compile' must be bool, got int (1)"


def test_post_init_error_from_one_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, NANO, ["pretrain.steps=0"])
    msg = str(e.value)
    assert msg == (f"override pretrain.steps=0 (the rest of section 'pretrain' from {tmp_path / 'nano.yaml'}): "
                   f"invalid section 'pretrain': steps must be > 0, got 0")
    assert no_line(msg) and isinstance(e.value.__cause__, ValueError)


def test_post_init_error_names_every_override_of_the_section_only(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, NANO, ["pretrain.steps=-3", "stages=[x]", "pretrain.optim.lr=0.5", "pretrain.model=n"])
    msg = str(e.value)
    assert msg.startswith("override pretrain.steps=-3, override pretrain.optim.lr=0.5, override pretrain.model=n "
                          f"(the rest of section 'pretrain' from {tmp_path / 'nano.yaml'}): invalid section 'pretrain'")
    assert "stages=[x]" not in msg and no_line(msg)


def test_post_init_error_of_section_made_by_overrides_alone(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, "stages: []\n", ["pretrain.model=m", "pretrain.steps=0"])
    assert str(e.value) == ("override pretrain.model=m, override pretrain.steps=0: "
                            "invalid section 'pretrain': steps must be > 0, got 0")
    with pytest.raises(ConfigError) as e:
        build_o(tmp_path, NANO, ["pretrain={model: m, steps: 0}"])
    assert str(e.value) == ("override pretrain={model: m, steps: 0}: "
                            "invalid section 'pretrain': steps must be > 0, got 0")


@dataclass
class Heads:
    hidden: int = 64
    heads: int = 4
    warmup: int | None = 0

    def __post_init__(self):
        self.head_dim = self.hidden // self.heads  # ZeroDivisionError for heads=0
        if self.warmup > 0:  # TypeError for warmup=None
            pass


@dataclass
class Model:
    attn: Heads = field(default_factory=Heads)
    name: str = "m"


def test_post_init_other_exceptions_become_config_errors(tmp_path):
    p = write(tmp_path, "attn:\n  hidden: 64\n  heads: 0\n")
    data, lines = load_yaml(p)
    with pytest.raises(ConfigError) as e:
        from_dict(Model, data, where=str(p), lines=lines)
    assert str(e.value) == (f"{p} line 1: invalid section 'attn': ZeroDivisionError: integer division or modulo by "
                            f"zero (while checking its values; zero or negative: heads=0)")
    assert isinstance(e.value.__cause__, ZeroDivisionError)

    with pytest.raises(ConfigError) as e:
        from_dict(Heads, {"warmup": None}, where="cfg.yaml")
    assert str(e.value).startswith("cfg.yaml: invalid top level: TypeError: '>' not supported")
    assert str(e.value).endswith("(while checking its values)")
    assert isinstance(e.value.__cause__, TypeError)


def test_post_init_other_exceptions_name_the_override(tmp_path):
    p = write(tmp_path, "attn:\n  hidden: 64\n")
    data, lines = load_yaml(p)
    for overrides, expected in [
        (["attn.heads=0"], f"override attn.heads=0 (the rest of section 'attn' from {p}): invalid section 'attn': "
                           f"ZeroDivisionError: integer division or modulo by zero "
                           f"(while checking its values; zero or negative: heads=0)"),
        (["attn.heads=0", "attn.hidden=-8"], "override attn.heads=0, override attn.hidden=-8: invalid section "
                                             "'attn': ZeroDivisionError: integer division or modulo by zero "
                                             "(while checking its values; zero or negative: hidden=-8, heads=0)"),
    ]:
        d = apply_overrides(data, overrides)
        with pytest.raises(ConfigError) as e:
            from_dict(Model, d, where=str(p), lines=lines, overridden=override_locations(overrides))
        assert str(e.value) == expected


def test_post_init_top_level_from_override():
    @dataclass
    class Top:
        n: int = 1
        other: int = 0

        def __post_init__(self):
            if self.n < 0:
                raise ValueError("n must be >= 0")

    overrides = ["n=-1"]
    with pytest.raises(ConfigError) as e:
        from_dict(Top, apply_overrides({}, overrides), where="cfg.yaml", overridden=override_locations(overrides))
    assert str(e.value) == "override n=-1: invalid top level: n must be >= 0"
    with pytest.raises(ConfigError) as e:
        from_dict(Top, apply_overrides({"other": 2}, overrides), where="cfg.yaml", lines={"other": 1},
                  overridden=override_locations(overrides))
    assert str(e.value) == "override n=-1 (the rest of the top level from cfg.yaml): invalid top level: n must be >= 0"


def test_overridden_without_matching_keys_changes_nothing(tmp_path):
    _, a = build(tmp_path, NANO, ["pretrain.steps=5"])
    _, b = build_o(tmp_path, NANO, ["pretrain.steps=5"])
    assert a == b and b.pretrain.steps == 5
