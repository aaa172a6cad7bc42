"""Block costs from whole models ("probes"), for a runtime that can only run whole models (vLLM) and for
costs that see blocks in sequence (caches, overlap) rather than alone.

A probe is the parent with one sub-block variant in every layer it can take (the other half of each
layer unchanged). With a cost per variant ``c`` and a per-model constant ``F`` (embedding, head, the
layer loop, the runtime's own work), a model's time is ``F + sum_i c(att_i) + c(ffn_i)``, so

    c(v) = (T(probe_v) - T(probe_no_op)) / n

where ``probe_no_op`` has that part removed from the same ``n`` layers: the difference of two
measured models, whatever the parent's other layers are. ``F = T(parent) - sum_i c(parent's blocks)``,
so the parent is explained in full by construction. Layer 0 keeps its attention in every attention
probe for vLLM and SGLang (they cannot run an FFN before the first attention; thinkfast.modeling.engine_rules), so
there ``n`` is one less for attention.

Departure from Puzzle (which times blocks on the target hardware): the additive model is an
assumption (tested: an additive runtime is recovered exactly; whether a real runtime is additive is
what ``parent_model`` vs the prediction for the child shows after the search).
"""

from __future__ import annotations

from ..modeling import DeciLMConfig
from ..modeling.configuration_decilm import attention_block, block_config, ffn_block

__all__ = ["NO_OP", "probe_configs", "costs_from_probes"]

NO_OP = "__no_op__"  # the anchor probe of a part (a measurement only; not a library variant)


def _replaced(n_layers: int, part: str, engine: str) -> list[int]:
    """Layer 0 keeps its own block in every probe (when there are others): a model without any attention
    (or FFN) skips work every real child still does (cache and mask set-up), which would be counted as
    each layer's saving; and vLLM / SGLang cannot run an FFN before the first attention."""
    return list(range(1 if n_layers > 1 else 0, n_layers))


def probe_configs(parent: DeciLMConfig, variants: dict[str, dict[str, dict]], engine: str = "hf"
                  ) -> tuple[dict[str, DeciLMConfig], dict[str, tuple[str, str, int, str]]]:
    """``({probe: config}, {key: (part, variant, layers replaced, probe)})`` for every variant of
    ``variants`` (part -> name -> released spec) and one no-op anchor per part. ``"parent"`` is the
    parent itself; identical models are built once (the parent's own variant is the parent; a library
    ``no_op`` is the anchor)."""
    base = [dict(b) for b in parent.to_dict()["block_configs"]]
    n = parent.num_hidden_layers
    anchors = {"attention": attention_block(no_op=True),
               "ffn": ffn_block(None, parent.hidden_size, no_op=True)}
    configs = {"parent": parent}
    what = {"parent": ("parent", "parent", 0, "parent")}
    seen = {repr(base): "parent"}
    for part in ("attention", "ffn"):
        layers = _replaced(n, part, engine)
        for name, spec in [(NO_OP, anchors[part]), *variants.get(part, {}).items()]:
            blocks = [dict(b) for b in base]
            for i in layers:
                blocks[i][part] = dict(spec)
            key = f"{part}.{name}"
            probe = seen.setdefault(repr(blocks), key)
            if probe == key:
                configs[key] = DeciLMConfig(**{**parent.to_dict(), "block_configs": [
                    block_config(b["attention"], b["ffn"]) for b in blocks]})
            what[key] = (part, name, len(layers), probe)
    return configs, what


def costs_from_probes(times: dict[str, dict[str, dict[str, float]]], what: dict[str, tuple[str, str, int, str]],
                      parent_blocks: list[tuple[str, str]]) -> dict:
    """Per-variant runtimes and the fixed part from measured probe times.

    ``times[probe][kind][batch]`` (kind ``prefill_s`` / ``decode_s``) for every probe that was built;
    ``what`` as :func:`probe_configs` returns it; ``parent_blocks[i]`` = the library names of layer
    ``i``'s own attention and FFN. Returns ``{"attention": {name: {kind: {b: s}}}, "ffn":
    {...}, "fixed": {kind: {b: s}}}``; costs below zero (noise on a variant cheaper than nothing)
    are 0, and ``fixed`` stays above zero.

    >>> t = {"parent": {"decode_s": {"1": 10.0}}, "attention.__no_op__": {"decode_s": {"1": 4.0}},
    ...      "ffn.__no_op__": {"decode_s": {"1": 8.0}}, "attention.kv1": {"decode_s": {"1": 7.0}}}
    >>> w = {"parent": ("parent", "parent", 0, "parent"), "attention.kv2": ("attention", "kv2", 2, "parent"),
    ...      "attention.kv1": ("attention", "kv1", 2, "attention.kv1"),
    ...      "attention.__no_op__": ("attention", "__no_op__", 2, "attention.__no_op__"),
    ...      "ffn.f8": ("ffn", "f8", 2, "parent"), "ffn.__no_op__": ("ffn", "__no_op__", 2, "ffn.__no_op__")}
    >>> c = costs_from_probes(t, w, [("kv2", "f8"), ("kv2", "f8")])
    >>> c["attention"]["kv2"]["decode_s"], c["attention"]["kv1"]["decode_s"], c["ffn"]["f8"]["decode_s"]
    ({'1': 3.0}, {'1': 1.5}, {'1': 1.0})
    >>> c["fixed"]["decode_s"]  # 10 - 2 * (3 + 1)
    {'1': 2.0}
    """
    kinds = list(times["parent"])
    out: dict = {"attention": {}, "ffn": {}}
    for key, (part, name, n, probe) in what.items():
        if part == "parent" or name == NO_OP:
            continue
        mine, anchor = times[probe], times[what[f"{part}.{NO_OP}"][3]]
        out[part][name] = {kind: {b: max(0.0, (mine[kind][b] - anchor[kind][b]) / n) for b in mine[kind]}
                           for kind in kinds}
    parent = times["parent"]
    # what the blocks do not explain; kept above zero (a noisy probe can overshoot), as every model pays it
    out["fixed"] = {kind: {b: max(1e-6 * parent[kind][b],
                                  parent[kind][b] - sum(out["attention"][a][kind][b] + out["ffn"][f][kind][b]
                                                        for a, f in parent_blocks))
                           for b in parent[kind]} for kind in kinds}
    return out
