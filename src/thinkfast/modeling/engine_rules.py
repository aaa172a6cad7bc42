"""What each serving engine loads of a nemotron-nas checkpoint, as rules a config is checked against.

The rules come from the engines' loaders (read in their source; vLLM's are also tested against real vLLM
in ``tests/test_vllm.py``):

- ``vllm`` (``vllm/model_executor/models/nemotron_nas.py``): per layer, GQA with any KV-head count or a
  no-op attention; SwiGLU or a no-op FFN; but an FFN in a layer before the first attention fails (its
  residual is only set by an attention; tests/test_vllm.py checks it still fails). No linear attention or FFN (it builds GQA for every attention
  that is not a no-op). FFN widths come only from ``ffn_mult`` through the released rule
  (``ceil_to_multiple(int(2 * ffn_mult * hidden / 3), 256)``), so a width must be a multiple of 256.
- ``sglang`` (``python/sglang/srt/models/nemotron_nas.py``): as vLLM, and every GQA layer must have the
  same KV-head count (its model config refuses "variable GQA").
- ``trtllm`` (``tensorrt_llm/_torch/models/modeling_nemotron_nas.py``, ``models/nemotron_nas/convert.py``):
  linear attention and FFN too; widths through ``ffn_mult`` (multiples of 256); its checkpoint
  converter reads ``lm_head.weight`` even when the embeddings are tied (:func:`untie_for` writes one).
- ``hf``: transformers with the remote code in the folder (or thinkfast): everything thinkfast writes.
"""

from __future__ import annotations

from ..config import ConfigError

ENGINES = ("vllm", "sglang", "trtllm", "hf")
# the engine a new library is made for (``library.engine``), and the one ``fuse`` checks a model against
# when nothing names one (neither ``fuse.engine`` nor the model's thinkfast.json)
DEFAULT_ENGINE = "vllm"
# a library.json written before libraries recorded their engine: its search space followed no engine's
# rules, so it was made for transformers (and so was the run's ``library.engine`` before the field existed)
UNRECORDED_LIBRARY_ENGINE = "hf"
_LINEAR = {"vllm": False, "sglang": False, "trtllm": True, "hf": True}
_WIDTH_MULTIPLE = {"vllm": 256, "sglang": 256, "trtllm": 256, "hf": 1}


class EngineError(ConfigError):
    """A model the target engine cannot load; the message names each offending block and why."""


def library_engine(lib: dict) -> str:
    """The engine a library (its ``library.json``, as read) was made for."""
    return lib.get("engine", UNRECORDED_LIBRARY_ENGINE)


def check_engine_name(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")


def supports_linear(engine: str) -> bool:
    return _LINEAR[engine]


def width_multiple(engine: str) -> int:
    """FFN widths the engine can express are multiples of this."""
    return _WIDTH_MULTIPLE[engine]


def untie_for(model, engine: str) -> bool:
    """Give ``model`` its own ``lm_head.weight`` (a copy of the embeddings) when ``engine`` needs one in
    the checkpoint (TensorRT-LLM's converter reads it even for tied models). Returns whether it did."""
    if engine != "trtllm" or not model.config.tie_word_embeddings:
        return False
    import torch

    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    return True


def problems(config, engine: str, *, untied_on_export: bool = False) -> list[str]:
    """Why ``engine`` cannot load a model of this nemotron-nas ``config`` ([] when it can).
    ``untied_on_export``: tied embeddings are fine, since :func:`untie_for` will write an ``lm_head``."""
    check_engine_name(engine)
    out = []
    kv = set()
    seen_attention = False
    for i, (att, ffn) in enumerate(config.block_specs()):
        if engine in ("vllm", "sglang") and att.kind == "no_op" and ffn.kind != "no_op" and not seen_attention:
            out.append(f"block {i}: an FFN with no attention before it in any layer ({engine} carries the residual "
                       "from the first attention on and fails without one)")
        seen_attention = seen_attention or att.kind != "no_op"
        if att.kind == "linear" and not _LINEAR[engine]:
            out.append(f"block {i}: linear attention ({engine} has none; it would build GQA and fail)")
        if ffn.kind == "linear" and not _LINEAR[engine]:
            out.append(f"block {i}: linear FFN ({engine} has none)")
        if ffn.kind == "swiglu" and ffn.intermediate_size % _WIDTH_MULTIPLE[engine]:
            out.append(f"block {i}: FFN width {ffn.intermediate_size} is not a multiple of 256 ({engine} reads "
                       f"widths only through ffn_mult, which rounds to 256)")
        if att.kind == "gqa":
            kv.add(att.num_kv_heads(config.num_attention_heads))
    if engine == "sglang" and len(kv) > 1:
        out.append(f"KV heads differ between layers ({sorted(kv)}); sglang needs one count for every GQA layer")
    if engine == "trtllm" and config.tie_word_embeddings and not untied_on_export:
        out.append("tied embeddings: TensorRT-LLM's checkpoint converter reads lm_head.weight, which a tied "
                   "checkpoint does not have")
    return out


def check_engine(config, engine: str, what: str, *, untied_on_export: bool = False) -> None:
    """Raise :class:`EngineError` listing every problem of ``config`` for ``engine``."""
    found = problems(config, engine, untied_on_export=untied_on_export)
    if found:
        raise EngineError(f"{what} cannot be served by {engine}: " + "; ".join(found)
                          + " (choose another engine with library.engine, e.g. hf, or change the search space)")
