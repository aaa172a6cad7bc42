"""GSM8K as a real parent's recipe data: every stage's file, from GSM8K's train split (and a plain English text).

``thinkfast gsm8k --source ../shared/data --out data/gsm8k`` writes (:func:`write_recipe_data`):

* ``text.jsonl``: the text BLD, replace-1-block scores and distillation read (the pipeline's ``data`` section,
  ``messages_field: messages``): each train problem as a chat, question then worked solution, rendered with the
  parent's own chat template; ``text.txt`` beside it, paragraphs of plain English (tinyshakespeare), so that the
  child keeps more than arithmetic prose. Both files whole: the ``data`` section holds some back by hash.
* ``sft.jsonl``: toggle SFT pairs (Llama-Nemotron's post-training schema): per problem an "on" example, the worked
  solution inside the think block then the final answer, and an "off" example, the final answer alone.
* ``grpo.jsonl``: RL prompts, question and ``solution`` (the gold number) for the math reward.
* ``if.jsonl``: instruction-following prompts in IFEval's schema made from GSM8K questions (1-2 of IFEval's
  instructions each, :func:`thinkfast.tasks.instructions.generate_if_prompts`), never one of IFEval's test
  prompts, each with its ``solution``: RLOO, the reward model's pairs and online RPO sample them.

The problems are split once, by a seeded shuffle, into disjoint parts (``sft``, ``grpo``, ``if``), so no stage
trains on another's prompts; ``text.jsonl`` holds all train problems (distillation only matches the parent).
GSM8K's test split is evaluation's (``gsm8k`` suite) and never read here. A solution's calculator annotations
(``<<48/2=24>>``) are removed; the final answer is written ``The answer is N.``, which math-verify reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_text
from .instructions import generate_if_prompts, ifeval_test_prompts
from .math import gsm8k_gold

__all__ = ["clean_solution", "final_sentence", "read_gsm8k", "recipe_rows", "write_recipe_data"]

_CALC = re.compile(r"<<[^>]*>>")


def clean_solution(answer: str) -> str:
    """GSM8K's worked solution without its calculator annotations and ``#### N`` line.

    >>> clean_solution("She sold 48/2 = <<48/2=24>>24 clips.\\n#### 24")
    'She sold 48/2 = 24 clips.'
    """
    body = answer.strip().rsplit("####", 1)[0]
    return "\n".join(line.rstrip() for line in _CALC.sub("", body).strip().splitlines())


def final_sentence(gold: str) -> str:
    """The final answer as both modes write it.

    >>> final_sentence("1234")
    'The answer is 1234.'
    """
    return f"The answer is {gold}."


def read_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K rows (``question``, ``answer``) of a JSON-lines file, each with ``gold`` added; a bad line is a
    ValueError naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"question": row["question"].strip(), "answer": row["answer"],
                             "gold": gsm8k_gold(row["answer"])})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path} line {i}: not a GSM8K row ({type(e).__name__}: {e})") from None
    return rows


def recipe_rows(rows: Sequence[dict], *, seed: int = 0, grpo: int = 1000, if_sources: int = 1000,
                if_prompts: int = 2000, instructions: tuple[int, int] = (1, 2),
                exclude: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Every file's rows from GSM8K train ``rows`` (:func:`read_gsm8k`): ``grpo`` problems for GRPO, ``if_sources``
    problems whose questions become ``if_prompts`` instruction prompts, the rest for SFT (each part disjoint);
    ``text`` holds every problem as a chat.

    >>> rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i+1}>>{i+1}\\n#### {i+1}",
    ...          "gold": str(i + 1)} for i in range(10)]
    >>> out = recipe_rows(rows, grpo=3, if_sources=3, if_prompts=4)
    >>> {k: len(v) for k, v in out.items()}
    {'text': 10, 'sft': 8, 'grpo': 3, 'if': 4}
    >>> on, off = out["sft"][:2]
    >>> on["output"].startswith("<think>\\n") and on["output"].endswith("The answer is " + on["solution"] + ".")
    True
    >>> off["output"] == "The answer is " + off["solution"] + "." and off["reasoning"] == "off"
    True
    """
    order = list(range(len(rows)))
    random.Random(f"gsm8k-recipe:{seed}").shuffle(order)
    if grpo + if_sources >= len(rows):
        raise ValueError(f"grpo={grpo} + if_sources={if_sources} leave no SFT problem of {len(rows)}")
    grpo_idx, if_idx, sft_idx = order[:grpo], order[grpo:grpo + if_sources], order[grpo + if_sources:]
    text = [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": clean_solution(r["answer"]) + "\n" +
                           final_sentence(r["gold"])}]} for r in rows]
    sft = []
    for i in sft_idx:
        r = rows[i]
        final = final_sentence(r["gold"])
        sft.append({"input": r["question"], "reasoning": "on", "solution": r["gold"],
                    "output": f"<think>\n{clean_solution(r['answer'])}\n</think>\n\n{final}"})
        sft.append({"input": r["question"], "reasoning": "off", "solution": r["gold"], "output": final})
    grpo_rows = [{"prompt": rows[i]["question"], "solution": rows[i]["gold"]} for i in grpo_idx]
    if_rows = generate_if_prompts([rows[i]["question"] for i in if_idx], if_prompts, seed=seed,
                                  instructions=instructions, exclude=exclude,
                                  extra=[{"solution": rows[i]["gold"]} for i in if_idx])
    return {"text": text, "sft": sft, "grpo": grpo_rows, "if": if_rows}


def _paragraphs(text: str, min_chars: int = 200) -> list[str]:
    """Blank-line separated paragraphs, consecutive short ones joined (by one line break, so that a paragraph
    reader keeps them together) up to ``min_chars``."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        cur = f"{cur}\n{para.strip()}" if cur else para.strip()
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


def write_recipe_data(source: str | Path, out: str | Path, *, seed: int = 0, grpo: int = 1000,
                      if_sources: int = 1000, if_prompts: int = 2000, instructions: tuple[int, int] = (1, 2),
                      english: str | Path | None = None) -> dict:
    """Write the recipe's files (module docstring) into ``out`` from the shared data folder ``source``
    (``gsm8k/train.jsonl``; ``ifeval/input_data.jsonl`` when present, whose prompts are never emitted;
    ``tinyshakespeare/input.txt`` unless ``english`` names another plain-text file). Each file is written
    atomically; returns ``{file: rows}`` (also written as ``manifest.json``)."""
    source, out = Path(source), Path(out)
    train = source / "gsm8k" / "train.jsonl"
    if not train.is_file():
        raise FileNotFoundError(f"{train}: GSM8K's train split is not there (../shared/data/SOURCES.md)")
    ifeval = source / "ifeval" / "input_data.jsonl"
    exclude = sorted(ifeval_test_prompts(ifeval)) if ifeval.is_file() else []
    parts = recipe_rows(read_gsm8k(train), seed=seed, grpo=grpo, if_sources=if_sources, if_prompts=if_prompts,
                        instructions=instructions, exclude=exclude)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, rows in parts.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        manifest[f"{name}.jsonl"] = len(rows)
    english = Path(english) if english is not None else source / "tinyshakespeare" / "input.txt"
    if english.is_file():
        paras = _paragraphs(english.read_text(encoding="utf-8"))
        atomic_write_text(out / "text.txt", "\n\n".join(paras) + "\n")
        manifest["text.txt"] = len(paras)
    manifest["source"] = {"gsm8k": str(train), "english": str(english) if english.is_file() else None,
                          "ifeval_excluded": len(exclude), "seed": seed}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest
