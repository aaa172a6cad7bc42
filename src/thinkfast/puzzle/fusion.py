"""FFN Fusion: runs of attention-free layers become one wide FFN, so the model has fewer sequential layers.

Paper: FFN Fusion (arXiv 2503.18908) sections 3-4; Llama-Nemotron (arXiv 2505.00949) section 2.1;
REFERENCE.md section 3. Once Puzzle has removed attention from consecutive layers, each is
``x + FFN_j(norm_j(x))``. When later FFNs barely depend on earlier ones, the run can take every member's
input to be the run's input (the *parallel form*) ``x + sum_j FFN_j(norm_j(x))``, which is ONE SwiGLU
FFN: the members' gate and up weights stacked along the intermediate axis, their down weights
concatenated. One wide matrix product replaces several narrow sequential ones (fewer layers, fewer
kernel launches, better use of the hardware at small batch).

- :func:`dependency_matrix`: ``M[i, j] = cosine_distance(h_j(X), h_j(X without block i))`` for ``i < j``,
  where ``h_j`` is layer ``j``'s update of the residual stream, averaged over tokens of real data.
- :func:`find_groups`: runs of consecutive attention-free SwiGLU layers, the last member of each left out
  (the paper finds it sensitive), split into groups of at most ``max_group`` members whose pairwise
  dependency stays under ``threshold``.
- :func:`fuse`: the fused model, still a nemotron-nas checkpoint, with fewer layers.

Departures: the paper shares the last member's RMSNorm across the fused FFN (an approximation); here each
member's norm weight is folded into its own gate and up columns (``W_gate_j @ diag(g_j)``; the fused
layer's norm weight is one), so the fused layer computes the parallel form exactly (a test checks it to
1e-5 in float32). Layers whose attention and FFN are both no-op compute the identity and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling.convert import load_full_state
from ..modeling import DeciLMConfig, DeciLMForCausalLM
from ..modeling.configuration_decilm import attention_block, block_config, ffn_block
from ..data import positions_and_mask

__all__ = ["FusionPlan", "dependency_matrix", "fusable", "find_groups", "fuse", "fused_layer_map", "identity_layers",
           "parallel_form"]


def identity_layers(config: DeciLMConfig) -> list[bool]:
    """Per layer: both sub-blocks no-op (the layer passes the residual stream through unchanged)."""
    return [a.kind == "no_op" and f.kind == "no_op" for a, f in config.block_specs()]


def fusable(config: DeciLMConfig) -> list[bool]:
    """Per layer: attention no-op and a SwiGLU FFN (the layers FFN Fusion can merge)."""
    return [a.kind == "no_op" and f.kind == "swiglu" for a, f in config.block_specs()]


@torch.no_grad()
def _updates(model: DeciLMForCausalLM, ids: torch.Tensor, skip: int | None = None,
             eos_id: int | None = None) -> list[torch.Tensor | None]:
    """Each layer's update ``y - x`` of the residual stream on ``ids`` [B, T]; layer ``skip`` removed."""
    inner = model.model
    x = inner.embed_tokens(ids)
    pos, mask = positions_and_mask(ids, eos_id)
    cos, sin = inner.rotary_emb(x, pos)
    out: list[torch.Tensor | None] = []
    for i, layer in enumerate(inner.layers):
        if i == skip:
            out.append(None)
            continue
        y = layer(x, cos, sin, mask, None)
        out.append((y - x).float())
        x = y
    return out


@torch.no_grad()
def dependency_matrix(model: DeciLMForCausalLM, batches, *, layers: list[int] | None = None,
                      eos_id: int | None = None) -> torch.Tensor:
    """``[L, L]`` float64: ``M[i, j]`` (``i < j``) = mean over tokens of the cosine distance between layer
    ``j``'s update with and without layer ``i``; 0 on and below the diagonal. ``layers`` restricts the
    removed blocks ``i`` (the others' rows stay 0); ``batches`` is an iterable of token-id tensors;
    ``eos_id``: documents closed by it attend only to themselves (``data.doc_mask``)."""
    L = model.config.num_hidden_layers
    rows = list(range(L)) if layers is None else sorted(set(layers))
    total = torch.zeros(L, L, dtype=torch.float64)
    count = 0
    for ids in batches:
        ref = _updates(model, ids, eos_id=eos_id)
        for i in rows:
            cut = _updates(model, ids, skip=i, eos_id=eos_id)
            for j in range(i + 1, L):
                a, b = (t.reshape(-1, t.shape[-1]).double() for t in (ref[j], cut[j]))  # float64: identical -> 0
                both_zero = (a.norm(dim=-1) == 0) & (b.norm(dim=-1) == 0)  # a no-op layer: no change
                cos = torch.where(both_zero, torch.ones_like(a[:, 0]), F.cosine_similarity(a, b, dim=-1, eps=1e-12))
                total[i, j] += (1 - cos).clamp(min=0).double().sum()
        count += ids.numel()
    return total / max(count, 1)


@dataclass
class FusionPlan:
    """What :func:`find_groups` decided: ``groups`` to fuse (each a list of consecutive layers),
    ``runs`` the maximal attention-free SwiGLU runs found, ``left_out`` each run's last member."""

    groups: list[list[int]]
    runs: list[list[int]]
    left_out: list[int]


def _runs(flags: list[bool]) -> list[list[int]]:
    runs, cur = [], []
    for i, ok in enumerate(flags):
        if ok:
            cur.append(i)
        else:
            if len(cur) >= 2:
                runs.append(cur)
            cur = []
    if len(cur) >= 2:
        runs.append(cur)
    return runs


def find_groups(config: DeciLMConfig, dependency: torch.Tensor | None = None, *, max_group: int = 4,
                threshold: float = float("inf"), leave_last: bool = True,
                groups: list[list[int]] | None = None) -> FusionPlan:
    """The groups to fuse. Explicit ``groups`` are validated and used as given. Otherwise: every maximal
    run of at least two consecutive attention-free SwiGLU layers; with ``leave_last`` its last member
    stays unfused; the rest is cut greedily into groups of at most ``max_group`` layers in which every
    pair's dependency ``M[i, j]`` is at most ``threshold`` (layers that fit no group stay as they are)."""
    flags = fusable(config)
    runs = _runs(flags)
    if groups is not None:
        seen: set[int] = set()
        for g in groups:
            if len(g) < 2 or list(g) != list(range(g[0], g[0] + len(g))):
                raise ValueError(f"fuse group {g}: name at least two consecutive layers, in order")
            bad = [i for i in g if not 0 <= i < len(flags) or not flags[i]]
            if bad:
                raise ValueError(f"fuse group {g}: layer(s) {bad} keep attention or have no SwiGLU FFN "
                                 "(only attention-free SwiGLU layers can be fused)")
            if seen & set(g):
                raise ValueError(f"fuse group {g} overlaps another group")
            seen |= set(g)
        return FusionPlan([list(g) for g in groups], runs, [])
    if max_group < 2:
        raise ValueError(f"max_group={max_group} must be >= 2")
    if threshold != float("inf") and dependency is None:
        raise ValueError("a dependency threshold needs the dependency matrix")
    out, left_out = [], []
    for run in runs:
        members = run[:-1] if leave_last else run
        if leave_last:
            left_out.append(run[-1])
        cur: list[int] = []
        for j in members:
            fits = len(cur) < max_group and all(
                dependency is None or float(dependency[i, j]) <= threshold for i in cur)
            if cur and not fits:
                if len(cur) >= 2:
                    out.append(cur)
                cur = []
            cur.append(j)
        if len(cur) >= 2:
            out.append(cur)
    return FusionPlan(out, runs, left_out)


def fused_layer_map(config: DeciLMConfig, groups: list[list[int]], *, drop_identity: bool = True) -> list[list[int]]:
    """For each layer of :func:`fuse`'s result, the layers of the input whose outputs it reproduces: its own
    (a group's last member), then each identity layer dropped after it (the residual stream passes them
    unchanged): what distillation compares hidden states against. Identity layers before the first kept
    layer reproduce the embeddings and are not listed."""
    last = {g[0]: g[-1] for g in groups}
    inside = {j for g in groups for j in g}
    out: list[list[int]] = []
    for i, ident in enumerate(identity_layers(config)):
        if i in last:
            out.append([last[i]])
        elif i in inside:
            continue
        elif drop_identity and ident:
            if out:
                out[-1].append(i)
        else:
            out.append([i])
    return out


def parallel_form(model: DeciLMForCausalLM, group: list[int], x: torch.Tensor) -> torch.Tensor:
    """``x + sum_j FFN_j(norm_j(x))`` over the group's layers (what the fused layer must compute)."""
    layers = model.model.layers
    return x + sum(layers[j].mlp(layers[j].post_attention_layernorm(x)) for j in group)


@torch.no_grad()
def fuse(model: DeciLMForCausalLM, groups: list[list[int]], *, drop_identity: bool = True) -> DeciLMForCausalLM:
    """A new model in which each group's layers are one layer with a SwiGLU FFN as wide as their sum
    (gate/up rows stacked with each member's RMSNorm weight folded into its columns; down columns
    concatenated) and no attention; identity layers (both sub-blocks no-op) are dropped when
    ``drop_identity``. The result owns copies of every weight."""
    config = model.config
    identity = identity_layers(config)
    layers = model.model.layers
    starts = {g[0]: g for g in groups}
    inside = {j for g in groups for j in g}
    hidden = config.hidden_size
    blocks, state = [], {}
    sd = model.state_dict()
    for i in range(config.num_hidden_layers):
        new = len(blocks)
        if i in starts:
            g = starts[i]
            gate = torch.cat([layers[j].mlp.gate_proj.weight * layers[j].post_attention_layernorm.weight[None, :] for j in g])
            up = torch.cat([layers[j].mlp.up_proj.weight * layers[j].post_attention_layernorm.weight[None, :] for j in g])
            down = torch.cat([layers[j].mlp.down_proj.weight for j in g], dim=1)
            if any(layers[j].mlp.gate_proj.bias is not None for j in g):
                raise ValueError("fusing FFNs with biases is not supported")
            blocks.append(block_config(attention_block(no_op=True), ffn_block(gate.shape[0], hidden)))
            prefix = f"model.layers.{new}."
            state[prefix + "post_attention_layernorm.weight"] = torch.ones_like(layers[g[0]].post_attention_layernorm.weight)
            state[prefix + "mlp.gate_proj.weight"] = gate
            state[prefix + "mlp.up_proj.weight"] = up
            state[prefix + "mlp.down_proj.weight"] = down
            continue
        if i in inside:
            continue
        if drop_identity and identity[i]:
            continue
        blocks.append(config.block_configs[i])
        old = f"model.layers.{i}."
        state.update({f"model.layers.{new}." + k[len(old):]: v.clone() for k, v in sd.items() if k.startswith(old)})
    for k, v in sd.items():
        if not k.startswith("model.layers."):
            state[k] = v.clone()
    new_config = DeciLMConfig(**{**config.to_dict(), "block_configs": blocks, "num_hidden_layers": len(blocks)})
    child = DeciLMForCausalLM(new_config).to(next(model.parameters()).device, next(model.parameters()).dtype)
    load_full_state(child, state)
    child.generation_config = model.generation_config
    return child.eval()
