"""A preallocated KV cache for nemotron-nas models: one buffer per attention layer, written in place.

``transformers``' ``DynamicCache`` grows every layer's keys and values with ``torch.cat`` at each step,
copying the whole cache each time: on the nano parent's decode step at batch 16 with 256 cached tokens
that copying was most of the step (benchmarks/decode_overhead.py). Here each layer's buffer
``[B, kv_heads, room, head_dim]`` is allocated on its first update (KV-head counts differ per layer),
new tokens are written in place, and attention reads a view of the filled part. The room starts at
what the first update needs (plus ``chunk``) and doubles when full, up to ``max_len``: a batch that
stops early never holds memory for ``max_new_tokens`` it did not generate.

Only what the nemotron-nas model calls is implemented (``update``, ``get_seq_length``; the model
accepts any object with those two methods), plus :meth:`select`, with which the rollout engine
(:mod:`thinkfast.generation`) lets finished sequences leave a batch, :meth:`truncate_to`, and for
continuous batching (:mod:`thinkfast.generation.continuous`) :meth:`join` (sequences join a running batch,
right-aligned) and :meth:`drop_front` (padding columns no sequence uses any more leave).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Room for up to ``max_len`` tokens per sequence in every attention layer (cache slot)."""

    def __init__(self, max_len: int, chunk: int = 256):
        self.max_len, self.chunk = int(max_len), int(chunk)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def _room(self, layer_idx: int, need: int) -> None:
        """Make slot ``layer_idx`` hold at least ``need`` tokens (allocating or doubling its buffers)."""
        if need > self.max_len:
            raise ValueError(f"StaticKVCache: {need} tokens do not fit in max_len={self.max_len}")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if need <= k.shape[2]:
            return
        room = min(self.max_len, max(need + self.chunk, 2 * k.shape[2]))
        n = self.lengths[layer_idx]
        for buffers, old in ((self.keys, k), (self.values, v)):
            new = old.new_empty(old.shape[0], old.shape[1], room, old.shape[3])
            new[:, :, :n] = old[:, :, :n]
            buffers[layer_idx] = new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Append ``[B, kv_heads, T, head_dim]`` keys and values to slot ``layer_idx``; return all of them."""
        if layer_idx == len(self.keys):
            b, h, _, d = key_states.shape
            self.keys.append(key_states.new_empty(b, h, 0, d))
            self.values.append(value_states.new_empty(b, h, 0, d))
            self.lengths.append(0)
        elif layer_idx > len(self.keys):
            raise IndexError(f"cache slot {layer_idx} used before slot {len(self.keys)}")
        n, t = self.lengths[layer_idx], key_states.shape[2]
        self._room(layer_idx, n + t)
        self.keys[layer_idx][:, :, n:n + t] = key_states
        self.values[layer_idx][:, :, n:n + t] = value_states
        self.lengths[layer_idx] = n + t
        return self.keys[layer_idx][:, :, :n + t], self.values[layer_idx][:, :, :n + t]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def truncate_to(self, length: int) -> None:
        """Keep the first ``length`` tokens of every slot (the buffers are reused)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (sequences that left a batch free their slots): the filled
        part of each buffer is copied into new buffers of the same room."""
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                n = self.lengths[i]
                new = old.new_empty(len(rows), old.shape[1], old.shape[2], old.shape[3])
                new[:, :, :n] = old[rows, :, :n]
                buffers[i] = new

    def join(self, other: "StaticKVCache") -> tuple[int, int]:
        """Append ``other``'s rows after this cache's, right-aligned: the shorter side is left-padded (with
        zeros, to be masked by the caller). Returns the columns of padding put before (this cache's rows,
        ``other``'s rows). Both caches must hold the same slots, each slot filled to one length."""
        if len(other) != len(self):
            raise ValueError(f"cannot join caches of {len(self)} and {len(other)} slots")
        if not len(self):
            return 0, 0
        mine, theirs = self.lengths[0], other.lengths[0]
        width = max(mine, theirs)
        room = min(max(self.max_len, other.max_len), width + self.chunk)
        self.max_len = max(self.max_len, other.max_len)
        for buffers, others in ((self.keys, other.keys), (self.values, other.values)):
            for i, (a, b) in enumerate(zip(buffers, others)):
                new = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], max(room, width), a.shape[3])
                new[: a.shape[0], :, width - mine : width] = a[:, :, :mine]
                new[a.shape[0] :, :, width - theirs : width] = b[:, :, :theirs]
                buffers[i] = new
        self.lengths = [width] * len(self.lengths)
        return width - mine, width - theirs

    def drop_front(self, n: int) -> None:
        """Remove the first ``n`` columns of every slot (in place: the kept columns move to the front)."""
        if n <= 0:
            return
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                m = self.lengths[i]
                buf[:, :, : m - n] = buf[:, :, n:m].clone()
        self.lengths = [max(0, m - n) for m in self.lengths]

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"StaticKVCache(max_len={self.max_len}, slots={len(self.keys)}, lengths={self.lengths})"
