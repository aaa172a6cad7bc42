"""Where and at what precision a process computes: the device, its threads, bf16 autocast, dtypes by name.

The seam where multi-process training enters: today one process on one device (``auto``: CUDA when
present); torchrun's rank and world size will be read here too, so stages and library code ask this
module, not ``torch.cuda`` or the environment.

Library code: it imports no stage. Stages validate a config's ``device`` with :func:`check_device` when
the config loads and resolve it with :func:`setup_device` (or :func:`resolve_device`) when they run.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading

import torch

__all__ = ["DTYPES", "PeakMemory", "autocast", "check_device", "native_bf16", "resolve_device", "resolve_precision",
           "setup_device", "torch_dtype"]

# dtypes by the names configs and artifacts use (costs.json's ``dtype``)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a name of :data:`DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: choose from {sorted(DTYPES)}")
    return DTYPES[name]


def check_device(name: str) -> None:
    """Validate a ``device`` value when the config loads (whether it exists is checked before a stage runs)."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"device={name!r}: choose auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. A device this machine lacks is a clear error."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but this machine has no CUDA device; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}, but MPS is not available here; use auto or cpu")
    return device


def setup_device(name: str) -> torch.device:
    """The stage's device (``auto``: CUDA when present); on a CPU, torch uses every core unless
    ``OMP_NUM_THREADS`` says otherwise (two 2-thread trainings on 2 cores ran 15x slower than one)."""
    device = resolve_device(name)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX. Elsewhere bf16 is emulated: on a 2-core AVX2 AMD EPYC a nano-parent training step took 18.5 s in
    bf16 autocast and 2.1 s in float32 (docs/LOG.md, 2026-12-02 session 4)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively (:func:`native_bf16`), else ``fp32``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: choose auto, bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights and optimizer stay float32) for ``precision="bf16"``, nothing for fp32;
    ``auto`` as :func:`resolve_precision` decides."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class PeakMemory:
    """The peak resident memory of this process and, apart, of its worker processes (e.g. a vLLM worker, grader
    pools) while the ``with`` block runs. This process's peak is the kernel's own high-water mark (``VmHWM``,
    reset at the start through ``/proc/self/clear_refs`` where Linux allows it), else the highest of samples taken
    every ``interval`` seconds; the workers' is the highest sampled sum of their resident memory.

    >>> with PeakMemory() as peak:
    ...     block = bytearray(64 << 20)
    >>> peak.self_bytes >= 64 << 20
    True
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.self_bytes = 0
        self.children_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    @staticmethod
    def _status_bytes(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            try:
                self.self_bytes = max(self.self_bytes, me.memory_info().rss)
                kids = 0
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        kids += child.memory_info().rss
                self.children_bytes = max(self.children_bytes, kids)
            except psutil.Error:
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._hwm = self._status_bytes("VmHWM") is not None
        except OSError:
            self._hwm = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._hwm:
            self.self_bytes = max(self.self_bytes, self._status_bytes("VmHWM") or 0)
