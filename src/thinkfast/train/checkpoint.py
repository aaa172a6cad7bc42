"""Resumable training state without pickle.

A checkpoint is a folder with two files::

    state.json            the structure: dicts, lists, tuples, numbers, strings, None, with a
                          placeholder {"__tensor__": "t3"} for each tensor; format "thinkfast-state/1"
    tensors.safetensors   the tensors, under the generated keys t0, t1, ...

``torch.save`` / ``torch.load`` write and read pickles, and unpickling runs whatever code the file
names: opening a checkpoint in a shared run directory would run code chosen by whoever wrote it.
Nothing here unpickles, and :func:`load_state` refuses a folder that holds only an old pickle.

What JSON cannot say is written with one-key tags, so a round trip gives back the same Python values:

* ``{"__tuple__": [...]}``   a tuple (AdamW's ``betas`` must come back as a tuple)
* ``{"__dict__": [[k, v], ...]}``  a dict with int keys (optimizer ``state`` is keyed by parameter
  index; ``opt.load_state_dict`` needs ints back), or a dict that looks like a tag itself
* ``{"__float__": "nan" | "inf" | "-inf"}``  a non-finite float (state.json stays strict JSON)
* ``{"__tensor__": "t0"}``   a tensor in tensors.safetensors

One tensor object that appears twice is stored once and comes back as one tensor, used twice; distinct
tensors that share memory (tied weights in a ``state_dict``, views) are stored as separate copies.

    save_state(stage.checkpoint_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "step": step, "rng": torch.get_rng_state()})
    state = load_state(stage.checkpoint_dir, device=device)
    model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())      # RNG states must be CPU uint8 tensors
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from thinkfast.config import ConfigError
from thinkfast.rundir import atomic_dir

__all__ = ["CheckpointError", "FORMAT", "STATE_FILE", "TENSORS_FILE", "PICKLE_SUFFIXES",
           "save_state", "load_state", "has_state"]

FORMAT = "thinkfast-state/1"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
# Files torch.save / pickle / HF's pytorch_model.bin leave behind; never opened here.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".pickle")

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
_TAGS = (_TENSOR, _TUPLE, _DICT, _FLOAT)


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be loaded; the message names the file and what to do."""


# --------------------------------------------------------------------------- save


class _Encoder:
    """Turns a state structure into JSON-able data, collecting tensors for safetensors."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, tuple[torch.Tensor, str]] = {}  # id(original) -> (original, key)
        self._storages: set[int] = set()  # data_ptr of storages already stored

    def encode(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return {_TENSOR: self._add_tensor(obj, path)}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)
            return {_FLOAT: "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if isinstance(obj, tuple):
            return {_TUPLE: [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            for k in obj:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"save_state: {path} has a key {k!r} of type {type(k).__name__}; "
                                    f"only str and int keys can be saved")
            plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS)
            if plain:
                return {k: self.encode(v, f"{path}[{k!r}]") for k, v in obj.items()}
            return {_DICT: [[int(k) if isinstance(k, int) else k, self.encode(v, f"{path}[{k!r}]")]
                            for k, v in obj.items()]}
        raise TypeError(f"save_state: {path} is a {type(obj).__module__}.{type(obj).__qualname__}; a state holds "
                        f"only dicts, lists, tuples, tensors, int, float, bool, str and None")

    def _add_tensor(self, t: torch.Tensor, path: str) -> str:
        hit = self._by_id.get(id(t))
        if hit is not None:
            return hit[1]
        if t.layout != torch.strided:
            raise TypeError(f"save_state: {path} is a {t.layout} tensor; only dense tensors can be saved")
        stored = t.detach()
        if stored.device.type != "cpu":
            stored = stored.to("cpu")
        # safetensors wants each tensor contiguous and owning its whole storage, shared with no other.
        ptr = stored.untyped_storage().data_ptr()
        owns = (stored.is_contiguous() and stored.storage_offset() == 0
                and stored.untyped_storage().nbytes() == stored.numel() * stored.element_size())
        if not owns or (ptr != 0 and ptr in self._storages):
            stored = stored.clone(memory_format=torch.contiguous_format)
            ptr = stored.untyped_storage().data_ptr()
        if ptr != 0:
            self._storages.add(ptr)
        key = f"t{len(self.tensors)}"
        self.tensors[key] = stored
        self._by_id[id(t)] = (t, key)  # keeps t alive, so its id is not reused during this save
        return key


def save_state(path: str | Path, state: dict) -> None:
    """Write ``state`` to the folder ``path`` (``state.json`` + ``tensors.safetensors``), atomically.

    ``state`` is a dict nesting dicts (str or int keys), lists, tuples, tensors (any dtype and
    device; stored on CPU) and int / float (NaN, inf included) / bool / str / None. The folder is
    written beside ``path`` and renamed into place, so an error or a crash leaves an older checkpoint
    at ``path`` whole. Anything else in ``state`` raises TypeError naming where it sits.
    """
    from safetensors.torch import save_file

    if not isinstance(state, dict):
        raise TypeError(f"save_state: state must be a dict, got {type(state).__name__}")
    enc = _Encoder()
    body = {"format": FORMAT, "tensors": TENSORS_FILE, "state": enc.encode(state, "state")}
    text = json.dumps(body, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    with atomic_dir(path) as tmp:
        save_file(enc.tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        (tmp / STATE_FILE).write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- load


def _pickle_refusal(file: Path) -> CheckpointError:
    return CheckpointError(
        f"{file} is a pickle checkpoint (from an older thinkfast or someone else); thinkfast does not load "
        f"pickles, which can run code. Rerun the stage with --force to start it over.")


def has_state(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint :func:`load_state` should be asked about: a ``state.json``,
    or an old pickle it will refuse (so a stage reports it instead of silently starting over)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in PICKLE_SUFFIXES
    if (path / STATE_FILE).is_file():
        return True
    return path.is_dir() and any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir())


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a folder written by :func:`save_state`; tensors are placed on ``device``.

    Raises :class:`CheckpointError` naming the file when ``state.json`` is missing, not JSON, of
    another format, or names tensors ``tensors.safetensors`` lacks, and when that file is missing or
    damaged. A folder (or a file) that holds a pickle checkpoint and no ``state.json`` is refused
    without being opened.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a folder with {STATE_FILE})")
    state_file, tensors_file = path / STATE_FILE, path / TENSORS_FILE
    if not state_file.is_file():
        if path.is_dir():
            pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_refusal(pickles[0])
        raise CheckpointError(f"{state_file}: missing; {path} is not a thinkfast checkpoint")
    try:
        body = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{state_file}: not a valid checkpoint state file ({e}); the checkpoint is "
                              f"damaged: rerun the stage with --force to start it over") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or "state" not in body:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise CheckpointError(f"{state_file}: not a {FORMAT} checkpoint (format {found!r}); it was written by "
                              f"another program or version: rerun the stage with --force to start it over")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(tensors_file), device=str(torch.device(device)))
    except FileNotFoundError:
        raise CheckpointError(f"{tensors_file}: missing (named by {state_file}); the checkpoint is incomplete: "
                              f"rerun the stage with --force to start it over") from None
    except Exception as e:  # safetensors reports damage with its own error types
        raise CheckpointError(f"{tensors_file}: damaged ({type(e).__name__}: {e}); rerun the stage with --force "
                              f"to start it over") from e
    state = _decode(body["state"], tensors, state_file, tensors_file, "state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: the saved state is a {type(state).__name__}, not a dict")
    return state


def _decode(obj: Any, tensors: dict, state_file: Path, tensors_file: Path, path: str) -> Any:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{state_file}: damaged at {path}: {what}")

    if isinstance(obj, list):
        return [_decode(v, tensors, state_file, tensors_file, f"{path}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj  # None, bool, int, float, str
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == _TENSOR:
            if not isinstance(val, str):
                raise bad(f"tensor key {val!r} is not a string")
            if val not in tensors:
                raise CheckpointError(f"{tensors_file}: has no tensor {val!r} (for {path}, named in {state_file}); "
                                      f"the checkpoint is damaged: rerun the stage with --force to start it over")
            return tensors[val]
        if tag == _TUPLE:
            if not isinstance(val, list):
                raise bad("a tuple that is not a list")
            return tuple(_decode(v, tensors, state_file, tensors_file, f"{path}[{i}]") for i, v in enumerate(val))
        if tag == _FLOAT:
            if val not in ("nan", "inf", "-inf"):
                raise bad(f"unknown float {val!r}")
            return float(val)
        if tag == _DICT:
            if not isinstance(val, list) or not all(
                    isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int))
                    and not isinstance(p[0], bool) for p in val):
                raise bad("a dict that is not a list of [key, value] pairs")
            return {k: _decode(v, tensors, state_file, tensors_file, f"{path}[{k!r}]") for k, v in val}
    return {k: _decode(v, tensors, state_file, tensors_file, f"{path}[{k!r}]") for k, v in obj.items()}
