"""The text every stage reads: the ``data`` section of a pipeline config.

One section, shared by every stage that reads text (``library``: calibration, BLD and its held-out loss;
``scores``; later distillation), so they all read the same corpus and the same held-out part::

    data:                       # the nano world (the default): the mix pretrain trains on, too
      kinds: [add, sub, mul, word, word]
      digits: [1, 2, 2]

    data:                       # your own files, loaded with Hugging Face ``datasets``
      files: [corpus/*.jsonl, extra.txt]
      text_field: text          # JSON lines / parquet: a column of strings, or
      messages_field: messages  # a column of chat messages, rendered with the parent's chat template
      held_out: 0.05

Formats by extension: plain text (``.txt``, ``.md``; one document per ``text_unit``: line, paragraph or
the whole file), JSON lines (``.jsonl``, ``.json``, either gzipped) and parquet (``.parquet``).

The held-out part is kept disjoint by content: a document is held out when a hash of its text falls in the
first ``held_out`` of the hash range, so the same document (repeated, or in two files) is always on the
same side, for the nano world's generated documents too. Stages draw rows from a split with
:meth:`Corpus.rows`, a pure function of a key (a resumed stage sees the rows an uninterrupted one saw).

Every bad row is an error naming its file and line (``DataError``): a missing or non-string text, messages
that are not a list of ``{"role", "content"}`` strings, a line that is not JSON, bytes that are not UTF-8.

How a packed row of documents is attended (:func:`doc_attention`, :func:`block_causal_mask`) is here too,
below the corpus: every stage that reads rows, and SFT's packing, mask them the same way. ``data.doc_mask``
is applied one way: :meth:`DataConfig.doc_eos` (``Corpus.doc_eos``) is the end-of-text id or None, and a
model's forward takes ``doc_attention(ids, eos)`` (packed samples: ``packed_attention(seq_ids)``), layers run by
hand ``positions_and_mask(ids, eos)``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

__all__ = ["DataConfig", "DataError", "Corpus", "held_out", "expand_files", "read_json_rows", "NANO_MIX",
           "block_causal_mask", "doc_attention", "document_ids", "packed_attention", "positions_and_mask"]

# the nano world's mix: the fields pretrain reads (they were pretrain's own before the data section)
NANO_MIX = ("kinds", "digits", "steps", "think_fraction", "fact_fraction", "copy_fraction", "phrased_fraction")
_TEXT = (".txt", ".text", ".md")
_JSON = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET = (".parquet",)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and, for a bad row, its line."""


@dataclass
class DataConfig:
    """Where the text comes from. No ``files``: the nano world. Defaults reproduce the nano parent's corpus."""

    files: list[str] = field(default_factory=list)  # paths or glob patterns; relative to the current folder
    text_field: str = "text"
    messages_field: str | None = None  # set: render this column of JSON / parquet files with the parent's chat template (plain-text files stay text)
    text_unit: Literal["line", "paragraph", "document"] = "paragraph"  # plain-text files: one document per ...
    # share of documents kept out of calibration and training, for measurements (before this section existed
    # there was no split: held-out rows were drawn from a stream of their own)
    held_out: float = field(default=0.1, metadata={"before": None})
    # the nano world (no files): documents of nano.tasks, worked step by step in think_fraction of them
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2, 2])  # repeats weight the draw
    steps: list[int] = field(default_factory=lambda: [2])
    think_fraction: float = 0.75
    fact_fraction: float = 0.0  # share of documents that are fact drills (nano.tasks.fact_drill_document)
    copy_fraction: float = 0.0  # share of documents that are copy drills (nano.tasks.copy_drill_document)
    # share of problem documents whose question is worded by a training template of nano.tasks.PHRASINGS
    phrased_fraction: float = 0.0
    # documents packed into one row attend only to themselves (block-diagonal causal mask, positions from 0
    # in each; doc_attention below), in every stage that reads rows: pretraining, the Puzzle stages,
    # fusion's measurements, distillation. A parent pretrained so must be measured and distilled so.
    doc_mask: bool = False

    def __post_init__(self):
        from .nano import tasks

        if isinstance(self.files, str):
            self.files = [self.files]
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"held_out={self.held_out} must be in (0, 1): the share of documents kept out")
        if not self.text_field:
            raise ValueError("text_field is empty")
        unknown = sorted(set(self.kinds) - set(tasks.KINDS))
        if unknown:
            raise ValueError(f"kinds: unknown kind(s) {unknown}; choose from {list(tasks.KINDS)}")
        if not self.kinds or not self.digits or not self.steps:
            raise ValueError("kinds, digits and steps must not be empty")
        if any(d < 1 for d in self.digits) or any(s < 1 for s in self.steps):
            raise ValueError(f"digits {self.digits} and steps {self.steps} must be >= 1")
        for name in ("think_fraction", "fact_fraction", "copy_fraction", "phrased_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.fact_fraction + self.copy_fraction > 1.0:
            raise ValueError("fact_fraction + copy_fraction must be <= 1")
        for f in self.files:
            if _format(f) is None and not glob.has_magic(f) and not Path(f).is_dir():
                raise ValueError(f"files: {f}: unknown format; name plain text ({', '.join(_TEXT)}), JSON lines "
                                 f"({', '.join(_JSON)}) or parquet (.parquet) files")

    @property
    def nano(self) -> bool:
        return not self.files

    def mix(self) -> dict:
        """Keyword arguments of :func:`thinkfast.nano.corpus.documents`."""
        return {k: getattr(self, k) for k in NANO_MIX}

    def doc_eos(self, tokenizer) -> int | None:
        """The token that closes a document of a packed row when ``doc_mask`` (the tokenizer's end of text),
        else None: the one argument of :func:`doc_attention` / :func:`positions_and_mask` that applies
        ``doc_mask``. A DataError when ``doc_mask`` is set and the tokenizer has no end-of-text token."""
        if not self.doc_mask:
            return None
        if tokenizer.eos_token_id is None:
            raise DataError("data.doc_mask: the parent's tokenizer has no end-of-text token to split rows into "
                            "documents at; set data.doc_mask: false")
        return tokenizer.eos_token_id

    def identity(self, use: str) -> dict:
        """What a stage's identity records of this section: ``use`` is ``"nano"`` (the mix only: pretrain)
        or ``"corpus"`` (the split corpus; the files themselves are identified by content elsewhere)."""
        if use == "nano":
            keys = NANO_MIX + ("doc_mask",)
        elif self.nano:
            keys = NANO_MIX + ("held_out", "doc_mask")
        else:
            keys = ("text_field", "messages_field", "text_unit", "held_out", "doc_mask")
        return {f"data.{k}": getattr(self, k) for k in keys}


def _format(path: str) -> str | None:
    name = str(path).lower()
    for fmt, exts in (("text", _TEXT), ("json", _JSON), ("parquet", _PARQUET)):
        if name.endswith(exts):
            return fmt
    return None


def expand_files(patterns: Sequence[str]) -> list[Path]:
    """Paths and glob patterns -> the files, in order (each pattern's matches sorted); a pattern that
    matches nothing, or a path that is not a file, is a DataError naming it."""
    out: list[Path] = []
    for p in patterns:
        matches = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
        if not matches:
            raise DataError(f"data.files: {p} matches no file")
        for m in matches:
            path = Path(m)
            if not path.is_file():
                raise DataError(f"data.files: {m} " + ("is a folder; name files or a glob pattern such as "
                                                      f"{m}/*.jsonl" if path.is_dir() else "does not exist"))
            if _format(m) is None:
                raise DataError(f"data.files: {m}: unknown format (by its extension)")
            if path.resolve() not in out:
                out.append(path.resolve())
    return out


def held_out(text: str, share: float) -> bool:
    """Whether a document is in the held-out part: by a hash of its text, so the split is by content."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h < share * 2**64


# ----------------------------------------------------------------------- files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _json_lines(path: Path) -> list[int]:
    """Line numbers of the non-blank lines of a JSON-lines file (row k of the dataset is line [k])."""
    with _open_text(path) as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _iter_json(path: Path):
    """``(line number, row, None)`` for every non-blank line of a JSON-lines file, ``(n, None, why)`` for a line
    that is not JSON; bytes that are not UTF-8 are a DataError."""
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, None, f"not JSON ({e.msg} at column {e.colno})"
                    continue
                yield n, row, None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None


def _scan_json(path: Path, check: Callable[[dict], str | None]) -> None:
    """Find the first bad line of a JSON-lines file that ``datasets`` could not load; raise naming it."""
    for n, row, why in _iter_json(path):
        if why is None and not isinstance(row, dict):
            why = f"a row must be a JSON object, got {type(row).__name__}"
        if why is None:
            why = check(row)
        if why:
            raise DataError(f"{path} line {n}: {why}")


def read_json_rows(patterns: Sequence[str], convert: Callable, *, skip_bad: bool = False, what: str = "data"
                   ) -> tuple[list, list[str]]:
    """``convert(row, "file:line")`` applied to every row of JSON-lines files (paths or globs). Returns
    (converted rows, skipped): a line that is not JSON, or a row ``convert`` rejects with a ValueError, is a
    DataError naming the file and line, or with ``skip_bad`` left out and listed as ``"file line N: why"``."""
    out: list = []
    skipped: list[str] = []
    for path in expand_files(patterns):
        if not str(path).endswith(_JSON):
            raise DataError(f"{path}: {what} must be JSON lines (.jsonl, .json, optionally .gz)")
        for n, row, why in _iter_json(path):
            if why is None:
                try:
                    out.append(convert(row, f"{path}:{n}"))
                    continue
                except ValueError as e:
                    why = str(e)
            if not skip_bad:
                raise DataError(f"{path} line {n}: {why} (set skip_bad_rows: true to skip such rows)")
            skipped.append(f"{path} line {n}: {why}")
    return out, skipped


def _scan_text(path: Path) -> None:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_messages(value) -> str | None:
    if not isinstance(value, list) or not value:
        return f"messages must be a non-empty list of {{'role', 'content'}}, got {_short(value)}"
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"each message must have string 'role' and 'content', got {_short(m)}"
    return None


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class Corpus:
    """The documents of a ``data`` section, split into ``train`` and ``held_out``, packed into token rows.

    ``tokenizer`` is the parent's; chat messages are rendered with its chat template. Files are read and
    every row checked when the corpus is made (a bad row fails here, before any training)."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        # documents end with this token and attend only to themselves (None: rows attend across documents);
        # a forward on rows takes doc_attention(ids, corpus.doc_eos), layers run by hand positions_and_mask
        self.doc_eos: int | None = cfg.doc_eos(tokenizer)
        self._cache: dict[tuple[int, int], list[int]] = {}
        self._cached_tokens = 0
        if cfg.nano:
            self.files, self._sets, self._index = [], [], {}
            return
        if cfg.messages_field and getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"data.messages_field={cfg.messages_field!r}, but the parent's tokenizer has no chat "
                            "template to render messages with; give text (data.text_field) or a tokenizer with one")
        self.files = expand_files(cfg.files)
        self._sets = [self._load(p) for p in self.files]
        index: dict[str, list[tuple[int, int]]] = {"train": [], "held_out": []}
        for fi, (ds, field_name, messages) in enumerate(self._sets):
            self._split(fi, ds, field_name, messages, index)
        self._index = index
        for split, rows in index.items():
            if not rows:
                raise DataError(f"data.files: no document falls in the {split} part ({len(index['train'])} train, "
                                f"{len(index['held_out'])} held out); give more documents or change data.held_out")

    # loading ----------------------------------------------------------------------------------------

    def _field(self) -> str:
        return self.cfg.messages_field or self.cfg.text_field

    def _check_value(self, value, messages: bool | None = None) -> str | None:
        name = self._field()
        if self.cfg.messages_field if messages is None else messages:
            return _check_messages(value)
        if value is None:
            return f"field {name!r} is missing or null"
        if not isinstance(value, str):
            return f"field {name!r} must be a string, got {_short(value)}"
        return None

    def _load(self, path: Path):
        import datasets

        fmt = _format(str(path))
        name = self._field()
        datasets.disable_progress_bars()
        try:
            if fmt == "text":
                ds = datasets.load_dataset("text", data_files=[str(path)], split="train",
                                           sample_by=self.cfg.text_unit, keep_linebreaks=self.cfg.text_unit != "line")
                return ds, "text", False  # plain text stays text beside chat files (messages_field)
            ds = datasets.load_dataset(fmt, data_files=[str(path)], split="train")
        except Exception as e:  # datasets / pyarrow name no line: find it ourselves, else name the file
            if fmt == "json":
                _scan_json(path, lambda row: self._check_value(row.get(name)))
            if fmt == "text":
                _scan_text(path)
            raise DataError(f"{path}: cannot be read as {fmt}: {type(e).__name__}: {str(e)[:300]}") from e
        finally:
            datasets.enable_progress_bars()
        if name not in ds.column_names:
            which = "messages_field" if self.cfg.messages_field else "text_field"
            raise DataError(f"{path}: no column {name!r} (columns: {', '.join(ds.column_names)}); set data.{which}")
        return ds, name, bool(self.cfg.messages_field)

    def _where(self, fi: int, row: int) -> str:
        path = self.files[fi]
        fmt = _format(str(path))
        if fmt == "json" and not _starts_with_bracket(path):
            return f"{path} line {_json_lines(path)[row]}"
        if fmt == "text" and self.cfg.text_unit == "line":
            return f"{path} line {row + 1}"
        return f"{path} row {row + 1}" if fmt != "text" else f"{path} ({self.cfg.text_unit} {row + 1})"

    def _split(self, fi: int, ds, name: str, messages: bool, index: dict) -> None:
        for start in range(0, len(ds), 1000):
            for k, value in enumerate(ds[start:start + 1000][name]):
                problem = self._check_value(value, messages)
                if problem:
                    raise DataError(f"{self._where(fi, start + k)}: {problem}")
                text = self._render(value) if messages else value
                if not text.strip():
                    continue  # a blank line or an empty text is no document
                index["held_out" if held_out(text, self.cfg.held_out) else "train"].append((fi, start + k))

    def _render(self, value) -> str:
        return self.tokenizer.apply_chat_template(value, tokenize=False)

    # rows -------------------------------------------------------------------------------------------

    def documents(self, split: str) -> int:
        """How many documents a split holds (0 for the nano world, whose documents are generated)."""
        return len(self._index.get(split, ()))

    def _tokens(self, fi: int, row: int) -> list[int]:
        key = (fi, row)
        ids = self._cache.get(key)
        if ids is None:
            ds, name, messages = self._sets[fi]
            value = ds[row][name]
            if messages:
                ids = self.tokenizer(self._render(value), add_special_tokens=False)["input_ids"]
                if self.doc_eos is not None:  # the template's own end may be another token
                    ids = ids + [self.doc_eos]
            else:
                ids = self.tokenizer(value)["input_ids"]
                if self.tokenizer.eos_token_id is not None:
                    ids = ids + [self.tokenizer.eos_token_id]
            if self._cached_tokens > 50_000_000:
                self._cache.clear()
                self._cached_tokens = 0
            self._cache[key] = ids
            self._cached_tokens += len(ids)
        return ids

    def rows(self, split: str, key: str, n: int, width: int) -> torch.Tensor:
        """Token ids ``[n, width]`` from ``split`` (``train`` or ``held_out``), a pure function of ``key``.

        Nano world: rows of whole generated documents, each row opening a document (as pretraining packs
        them). Files: documents drawn at random from the split and packed end to end, a document longer
        than a row entered at a random point."""
        if split not in ("train", "held_out"):
            raise ValueError(f"split {split!r}: choose train or held_out")
        rng = random.Random(key)
        if self.cfg.nano:
            from .nano.corpus import packed_rows

            want = split == "held_out"
            return packed_rows(self.tokenizer, rng, n, width,
                               keep=lambda doc: held_out(doc, self.cfg.held_out) == want, **self.cfg.mix())
        docs = self._index[split]
        stream: list[int] = []
        while len(stream) < n * width:
            ids = self._tokens(*docs[rng.randrange(len(docs))])
            start = rng.randrange(len(ids) - width + 1) if len(ids) > width else 0
            stream.extend(ids[start:start + n * width - len(stream)])
        return torch.tensor(stream, dtype=torch.long).view(n, width)


def _starts_with_bracket(path: Path) -> bool:
    with _open_text(path) as f:
        head = f.read(256).lstrip()
    return head.startswith("[")


# Attention inside packed rows: each packed sample (SFT) or document (pretraining, distillation, the Puzzle
# stages with ``data.doc_mask``) attends only to itself, with positions from 0, so that it gets the logits it
# gets alone (the block-diagonal causal mask of Llama 3's pretraining, Megatron's ``reset_attention_mask`` /
# ``reset_position_ids``).


def packed_attention(seq_ids: torch.Tensor) -> dict:
    """Keyword arguments for a model's forward on packed rows, each sequence attending only to itself
    (``seq_ids`` [B, T]: the sequence's index within its row, -1 on padding): ``packed_layout`` (a
    :class:`thinkfast.modeling.modeling_decilm.PackedLayout`: nemotron-nas models, and transformers models switched
    by :func:`thinkfast.modeling.packed.use_packed_attention`, attend within each sequence only, about twice as
    fast) and ``attention_mask``, the same rule as a dense mask (:func:`block_causal_mask`) for any other model."""
    from .modeling.modeling_decilm import PackedLayout

    return {"attention_mask": block_causal_mask(seq_ids), "packed_layout": PackedLayout(seq_ids)}


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """``seq_ids`` [B, T] -> bool [B, 1, T, T]: token i attends to token j <= i of the same sample. Padding
    (-1) attends to itself only, so no row is fully masked."""
    t = seq_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)
    eye = torch.eye(t, dtype=torch.bool, device=seq_ids.device)
    return ((same & causal) | eye)[:, None]


def document_ids(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of documents each closed by ``eos_id`` (pretraining's packing) -> ``seq_ids`` (the document's
    index within its row; an end-of-text token belongs to the document it closes) and ``position_ids``
    (from 0 in every document), each ``[B, T]``: with :func:`block_causal_mask`, every document of a row
    gets the logits it gets alone."""
    closes = (ids == eos_id).long()
    seq = torch.cumsum(closes, dim=-1) - closes  # the eos itself stays in its document
    t = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    first = torch.ones_like(closes, dtype=torch.bool)
    first[:, 1:] = seq[:, 1:] != seq[:, :-1]
    start = torch.cummax(torch.where(first, t, torch.zeros_like(t)), dim=-1).values
    return seq, t - start


def doc_attention(ids: torch.Tensor, eos_id: int | None) -> dict[str, torch.Tensor]:
    """Keyword arguments for a model's forward on rows ``ids`` [B, T] of documents closed by ``eos_id``:
    ``position_ids`` and :func:`packed_attention`'s ``packed_layout`` and ``attention_mask`` (bool [B, 1, T, T]);
    ``{}`` (plain causal attention over the whole row) when ``eos_id`` is None."""
    if eos_id is None:
        return {}
    seq, pos = document_ids(ids, eos_id)
    return {"position_ids": pos, **packed_attention(seq)}


def positions_and_mask(ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(position_ids, mask)`` for running a nemotron-nas model's layers by hand on ``ids`` [B, T]: positions
    from 0 in each document and a :class:`~thinkfast.modeling.modeling_decilm.PackedLayout` (each document
    attends to itself only), or (``eos_id`` None) positions over the row and ``None`` (plain causal)."""
    if eos_id is None:
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1), None
    from .modeling.modeling_decilm import PackedLayout

    seq, pos = document_ids(ids, eos_id)
    return pos, PackedLayout(seq)
