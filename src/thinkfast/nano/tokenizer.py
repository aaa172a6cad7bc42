"""Nano-world tokenizer: a small byte-level BPE with one token per digit, built locally (no downloads).

Digits are always single tokens (``0``..``9``, never merged with each other or with a space), so a
sub-million-parameter Llama sees every digit of a worked solution on its own, as a character model would.
Everything else is byte-level BPE (GPT-2 pre-tokenisation) trained in about half a second on a fixed
sample of nano-world documents, so the connective words of the traces (`` write``, `` carry``,
`` so far``, ``Problem``) are one token each. A worked 2-digit product is about 370 tokens instead of
560 characters: docs/LOG.md measures what that buys the parent.

Ids:

* 0 ``<|end_of_text|>`` (eos; also pad and the pretraining document separator)
* 1 ``<|begin_of_text|>`` (bos; not added automatically -- the chat template writes it and plain-text
  pretraining documents go without it)
* 2 ``<|unk|>`` (kept for tokenizer APIs; byte-level BPE never needs it)
* 3-5 ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (special)
* then the 256 byte symbols, the learned merges, and last ``<think>``, ``</think>`` (normal added
  tokens: single ids that ``decode(..., skip_special_tokens=True)`` keeps).

``decode(encode(s)) == s`` for any string. The build is deterministic (same corpus, same trainer), and
every model folder carries its own ``tokenizer.json``, so a later change of the recipe never changes
the tokenizer of a saved model.

Prompt boundaries: the text prompts end right before a space or newline (``Answer:`` then `` 85``;
``step.`` newline then the trace), and the GPT-2 pre-tokeniser never merges a space or newline into
the token before it, so a prompt tokenises exactly as the same text does inside a training document.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS",
    "EOS",
    "NANO_TOKENIZER_ID_COUNT",
    "UNK",
    "build_tokenizer",
    "save_tokenizer",
]

EOS = "<|end_of_text|>"
BOS = "<|begin_of_text|>"
UNK = "<|unk|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
EOT = "<|eot_id|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_SPECIAL = (EOS, BOS, UNK, HEADER_START, HEADER_END, EOT)
_NORMAL_TAIL = (THINK_OPEN, THINK_CLOSE)
VOCAB_SIZE = 512  # the trainer stops earlier when no pair repeats: the nano world has few words
NANO_TOKENIZER_ID_COUNT = 501  # == len(build_tokenizer()); a test pins it
MODEL_MAX_LENGTH = 2048
# Pre-tokens: one digit; a word with the one space after it ("donates "); a run of other symbols with
# the one space after it (", "); one whitespace character. So "He donates 9 books." -> "He ", "donates ", "9", " ", "books", ".", and a
# number in the question follows the same single token as where the trace copies it ("donates 9").
_PIECES = r"\d|[A-Za-z']+ ?|[^\sA-Za-z\d]+ ?|\s"


def _added(token: str, special: bool) -> AddedToken:
    return AddedToken(token, special=special, normalized=False, lstrip=False, rstrip=False,
                      single_word=False)


def _training_corpus(n: int = 3000):
    """A fixed sample of everything the nano world writes: problems of all kinds and sizes, worked and
    direct pretraining documents, chat prompts and responses, and the toggle's system prompts."""
    from thinkfast.nano import tasks
    from thinkfast.toggle import SYSTEM_OFF, SYSTEM_ON

    rng = random.Random("thinkfast-nano-tokenizer")
    yield SYSTEM_ON
    yield SYSTEM_OFF
    for i in range(n):
        p = tasks.sample_problem(rng, tasks.KINDS[i % len(tasks.KINDS)], rng.choice((1, 2, 3)),
                                 rng.choice((1, 2, 3)))
        yield tasks.pretrain_document(p, "think" if i % 3 else "direct")
        yield tasks.chat_prompt(p) + "\n" + tasks.chat_response(p, True)


@functools.lru_cache(maxsize=1)
def _core_json() -> str:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_training_corpus(), trainer=trainer)
    core.add_tokens([_added(t, False) for t in _NORMAL_TAIL])
    return core.to_str()


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Build the nano tokenizer (deterministic ids, chat template installed)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_core_json()),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        extra_special_tokens=[HEADER_START, HEADER_END, EOT],
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    from thinkfast.toggle import install_chat_template

    added = install_chat_template(tok)
    assert added == [], f"chat template added tokens {added}; the nano vocabulary must already have them"
    assert len(tok) == NANO_TOKENIZER_ID_COUNT, (len(tok), NANO_TOKENIZER_ID_COUNT)
    return tok


def save_tokenizer(path: str | Path) -> tuple[str, ...]:
    """Build the tokenizer and ``save_pretrained`` it to ``path``."""
    return build_tokenizer().save_pretrained(str(path))
