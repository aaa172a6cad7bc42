"""Character-level tokenizer for the nano world, built locally (no downloads).

Every character is one token, so a 2-4M parameter Llama sees each digit of a
worked solution individually.  Ids are fixed by construction:

* 0 ``<|end_of_text|>`` (eos; also pad and the pretraining document separator)
* 1 ``<|begin_of_text|>`` (bos; not added automatically -- the chat template
  writes it and plain-text pretraining documents go without it)
* 2 ``<|unk|>`` (any character outside the vocabulary)
* 3.. the printable ASCII characters of :data:`string.printable`, in that
  order, including ``' '`` and ``'\\n'`` but not ``\\t \\r \\x0b \\x0c``
* then ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (special)
  and ``<think>``, ``</think>`` (normal added tokens: single ids that
  ``decode(..., skip_special_tokens=True)`` keeps).

``decode(encode(s)) == s`` for any string over this alphabet.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS",
    "CHARS",
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

CHARS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
_SPECIAL_HEAD = (EOS, BOS, UNK)
_SPECIAL_TAIL = (HEADER_START, HEADER_END, EOT)
_NORMAL_TAIL = (THINK_OPEN, THINK_CLOSE)
_ALL = _SPECIAL_HEAD + CHARS + _SPECIAL_TAIL + _NORMAL_TAIL
NANO_TOKENIZER_ID_COUNT = len(_ALL)  # == len(build_tokenizer())
MODEL_MAX_LENGTH = 2048


def _added(token: str, special: bool) -> AddedToken:
    return AddedToken(token, special=special, normalized=False, lstrip=False, rstrip=False,
                      single_word=False)


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Build the character tokenizer (deterministic ids, chat template installed)."""
    vocab = {tok: i for i, tok in enumerate(_ALL)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One pre-token per character, newline included ([\s\S], not '.').
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate tokens: no spaces inserted
    # Multi-character tokens must be matched before the per-character split.
    core.add_special_tokens([_added(t, True) for t in _SPECIAL_HEAD + _SPECIAL_TAIL])
    core.add_tokens([_added(t, False) for t in _NORMAL_TAIL])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        extra_special_tokens=list(_SPECIAL_TAIL),
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
