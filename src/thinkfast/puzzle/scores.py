"""Replace-1-block scores: the quality of every library block, measured with that one layer swapped into
the otherwise unchanged parent (Puzzle, arXiv 2411.19146, section 4.3).

KL(parent || model) per token (the paper's choice: it beat LM loss and downstream accuracy) and the LM
loss. The parent's activations up to the swapped layer are computed once per batch and reused for all
that layer's blocks (exact: the layers before it are unchanged).

Shapes: ``ids`` [N, T + 1] (inputs and shifted labels); logits [B, T, V].
"""

from __future__ import annotations

import torch

from .parent import block_module, kl_and_lm_loss, layer_io, library_blocks, logits_from

__all__ = ["replace_one_block_scores"]


@torch.no_grad()
def replace_one_block_scores(parent, lib: dict, tensors: dict, ids: torch.Tensor, batch: int,
                             eos_id: int | None = None) -> list[dict]:
    """KL(parent || parent with one layer replaced) and LM loss for every library block, each the mean over
    batches of ``batch`` rows of ``ids`` [N, T + 1]: ``[{"layer", "attention", "ffn", "kl", "lm_loss"}, ...]``;
    ``eos_id``: documents closed by it attend only to themselves (``data.doc_mask``)."""
    from tqdm.auto import tqdm

    per_layer = {i: library_blocks(lib, tensors, i) for i in lib["layers"]}
    modules: dict[tuple, torch.nn.Module] = {}  # built once, reused for every batch
    sums: dict[tuple, list[float]] = {}
    n_batches = 0
    total = sum(len(b) for b in per_layer.values())
    for s in range(0, ids.shape[0], batch):
        chunk = ids[s:s + batch]
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        io = layer_io(parent, inputs, eos_id)
        parent_logits = parent.lm_head(parent.model.norm(io.y[-1])).float()
        bar = tqdm(total=total, desc=f"scores batch {n_batches + 1}", unit="block", leave=False)
        for i, blocks in per_layer.items():
            for b in blocks:
                key = (i, b.attention, b.ffn)
                if key not in modules:
                    modules[key] = block_module(parent.config, b).to(ids.device)
                h = modules[key](io.x[i], io.cos, io.sin, io.mask, None)
                logits = logits_from(parent, h, i + 1, io.cos, io.sin, io.mask)
                kl, lm = kl_and_lm_loss(parent_logits, logits, labels)
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += kl
                acc[1] += lm
                bar.update()
        bar.close()
        n_batches += 1
    return [{"layer": i, "attention": a, "ffn": f, "kl": v[0] / n_batches, "lm_loss": v[1] / n_batches}
            for (i, a, f), v in sums.items()]
