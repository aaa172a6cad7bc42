"""Plain-text nano-world documents packed into fixed-length token rows (pretraining, BLD, scoring).

Rows start at a document boundary (position 0 always opens a problem, as at evaluation); documents
are separated by end-of-text and the last one of a row is cut.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from . import tasks

__all__ = ["documents", "packed_rows"]


def documents(rng: random.Random, n: int, kinds: Sequence[str] = tasks.KINDS, digits: Sequence[int] = (1, 2, 2),
              steps: Sequence[int] = (2,), think_fraction: float = 0.75, fact_fraction: float = 0.0,
              copy_fraction: float = 0.0, phrased_fraction: float = 0.0) -> list[str]:
    """``n`` random documents: worked (think) or bare (direct) problems, fact drills or copy drills; in
    ``phrased_fraction`` of the problem documents the question is worded by one of the "train" templates of
    :data:`tasks.PHRASINGS` (``Problem: Hi! Compute 47 + 38. Thanks.``), the parent learning to read a question
    wherever it sits in the prompt (issue 26)."""
    docs = []
    for _ in range(n):
        u = rng.random()
        if u < fact_fraction:
            docs.append(tasks.fact_drill_document(rng))
            continue
        if u < fact_fraction + copy_fraction:
            docs.append(tasks.copy_drill_document(rng))
            continue
        kind = rng.choice(list(kinds))
        problem = tasks.sample_problem(rng, kind, rng.choice(list(digits)), rng.choice(list(steps)))
        mode = "think" if rng.random() < think_fraction else "direct"
        template = (tasks.phrasing(problem, rng, "train")
                    if phrased_fraction > 0 and rng.random() < phrased_fraction else None)
        docs.append(tasks.pretrain_document(problem, mode, template))
    return docs


def packed_rows(tokenizer, rng: random.Random, rows: int, width: int, keep=None, **doc_kwargs) -> torch.Tensor:
    """Token ids ``[rows, width]`` packed from whole documents (``doc_kwargs`` go to :func:`documents`);
    ``keep(document) -> bool``, when given, skips the documents it refuses (a split of the world). A document
    longer than a row is left out: cut, it would never show its answer (a worked 3-digit product, ~770 tokens)."""
    eos = tokenizer.eos_token_id
    out = []
    for _ in range(rows):
        row: list[int] = []
        misses = 0
        while len(row) < width:
            if misses > 64:
                raise ValueError(f"no document of this mix fits a row of {width} tokens: raise the row length")
            misses += 1
            docs = documents(rng, 8, **doc_kwargs)
            if keep is not None:
                docs = [d for d in docs if keep(d)]
                if not docs:
                    continue
            for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
                if len(ids) >= width:
                    continue
                misses = 0
                row.extend(ids)
                row.append(eos)
                if len(row) >= width:
                    break
        out.append(row[:width])
    return torch.tensor(out, dtype=torch.long)
