"""ExpertFlow's own CPU kernels for quantized matrix products (``csrc/qgemv.c``), compiled on first use.

torch's weight-only CPU kernels convert every weight to float; on a decode step (one row of activations) that
conversion, not memory, bounds them. These kernels quantize each row of activations to int8 (per weight group
for int4, per 64 columns for int8) and use the CPU's integer dot products (AVX-512 VNNI), as llama.cpp does,
reading a block of weights once for up to 64 rows: a different rounding from torch's kernels, measured in
docs/quantization.md, and the same result for a row whatever rows come with it.

The source is compiled once per machine with the system's C compiler into ``cache_dir()/kernels`` and loaded
with ctypes. Without a compiler, without AVX-512 VNNI and VBMI, or with ``EXPERTFLOW_KERNELS=torch``, every
product runs on torch's kernels: :func:`status` says which, and why. ``EXPERTFLOW_KERNELS=native`` sends every
product they take to them, however small (by default small matrices stay on torch's: to measure the native
kernels' accuracy on a small model with ``eval ppl``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from expertflow.core import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "qgemv.c"
#: What the kernels use; each must be in /proc/cpuinfo's flags.
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi")
# Explicit ISA flags rather than -march=native: g++ 12 miscompiles AMX code that -march=native turns on.
CFLAGS = (
    "-O3",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
    "-mavx512vbmi",
    "-mfma",
    "-mtune=native",
)
ENV = "EXPERTFLOW_KERNELS"

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_state: tuple[ctypes.CDLL | None, str, bool] | None = None  # (library, status, forced), read once
_generation = 0


class _Stack(ctypes.Structure):
    """``ef_q4_stack``: an int4 weight of every slot, ``[slots, ...]`` tensors."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("w_stride", ctypes.c_long),
        ("qp", ctypes.c_void_p),
        ("qp_stride", ctypes.c_long),
        ("group", ctypes.c_long),
    ]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str) -> Path:
    """The compiled library for this source, flags and compiler, built once (atomically) into the cache."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + version.encode()).hexdigest()[
        :16
    ]
    target = cache_dir() / "kernels" / f"qgemv-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # concurrent builders each write their own file; one rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> tuple[ctypes.CDLL | None, str]:
    choice = os.environ.get(ENV, "auto")
    if choice == "torch":
        return None, f"torch's kernels ({ENV}=torch)"
    if choice not in ("auto", "native"):
        return None, f"torch's kernels ({ENV}={choice!r} is not one of auto, native, torch)"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"torch's kernels (the CPU lacks {', '.join(missing)})"
    cc = _compiler()
    if cc is None:
        return None, "torch's kernels (no C compiler to build ExpertFlow's)"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except OSError as exc:
        log.warning("ExpertFlow's quantized kernels could not be built; using torch's: %s", exc)
        return None, f"torch's kernels (building ExpertFlow's failed: {exc})"
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.ef_q4_gemm.argtypes = [p, i, n, p, p, i, n, n, n, p, i]
    lib.ef_q8_gemm.argtypes = [p, i, n, p, p, i, n, n, p, i]
    stack = ctypes.POINTER(_Stack)
    lib.ef_q4_swiglu.argtypes = [p, i, n, n, n, p, stack, stack, i, p, i]
    lib.ef_q4_swiglu_rows.argtypes = [p, i, n, n, n, n, p, p, p, stack, stack, i, p, i]
    lib.ef_q4_gemm.restype = lib.ef_q8_gemm.restype = lib.ef_q4_swiglu.restype = i
    lib.ef_q4_swiglu_rows.restype = i
    return lib, "ExpertFlow's AVX-512 VNNI kernels (activations in int8)"


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where torch's run instead (see :func:`status`)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = (*_load(), os.environ.get(ENV) == "native")
    return _state[0]


def status() -> str:
    """Which kernels quantized products run on, and why."""
    library()
    assert _state is not None
    return _state[1]


def reset() -> None:
    """Forget the choice, so that the next product decides again (after changing ``EXPERTFLOW_KERNELS``)."""
    global _state, _generation
    with _lock:
        _state = None
        _generation += 1


def generation() -> int:
    """Changes whenever :func:`reset` forgets the choice: callers that cached a plan made from it re-plan."""
    return _generation


def forced() -> bool:
    """Whether every product these kernels take goes to them (``EXPERTFLOW_KERNELS=native``, read with the
    choice of kernels: :func:`reset` reads it again)."""
    library()
    assert _state is not None
    return _state[2]


def supports(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether these kernels take this product: CPU tensors in fp32 or bf16."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and scales.dtype in _DTYPES


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, qparams: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    """``x [m, in] @ W.T -> [m, out]`` (padded sizes) for an int4 weight in the CPU int4 layout, in x's dtype."""
    lib = library()
    assert lib is not None
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=x.dtype)
    rc = lib.ef_q4_gemm(
        x.data_ptr(), _DTYPES[x.dtype], m, qweight.contiguous().data_ptr(), qparams.contiguous().data_ptr(),
        _DTYPES[qparams.dtype], out_features, k, group_size, y.data_ptr(), _DTYPES[y.dtype],
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the int4 kernel could not allocate its buffers")
    return y


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [m, in] @ W.T -> [m, out]`` for a per-channel int8 weight ``[out, in]``, in x's dtype."""
    lib = library()
    assert lib is not None
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    rc = lib.ef_q8_gemm(
        x.data_ptr(), _DTYPES[x.dtype], m, qweight.contiguous().data_ptr(), scales.contiguous().data_ptr(),
        _DTYPES[scales.dtype], n, k, y.data_ptr(), _DTYPES[y.dtype],
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the int8 kernel could not allocate its buffers")
    return y


class Int4Swiglu:
    """``down(silu(gate(x)) * up(x))`` of chosen slots' experts for one row, with the arguments that never
    change between calls (the stacked weights, their strides, the sizes) prepared once: a fine-grained model's
    decode step makes this call once a layer, and ctypes' argument building costs more than the call.

    ``gate_up`` and ``down`` are ``(qweight, qparams, group)`` stacked over slots (each slot's tensor
    contiguous, slots ``stride(0)`` apart), unpadded (``2 * ffn`` and ``hidden`` rows multiples of 16, inputs
    multiples of their groups). The tensors are kept alive by this object.
    """

    def __init__(
        self,
        gate_up: tuple[torch.Tensor, torch.Tensor, int],
        down: tuple[torch.Tensor, torch.Tensor, int],
        ffn: int,
    ) -> None:
        lib = library()
        assert lib is not None
        self.generation = generation()
        stacks = []
        for qweight, qparams, group in (gate_up, down):
            assert qweight[0].is_contiguous() and qparams[0].is_contiguous()
            stacks.append(
                _Stack(qweight.data_ptr(), qweight.stride(0), qparams.data_ptr(), qparams.stride(0), group)
            )
        self._tensors = (gate_up[0], gate_up[1], down[0], down[1])
        self._stacks = stacks
        self._up, self._down = ctypes.byref(stacks[0]), ctypes.byref(stacks[1])
        self.dtype = gate_up[1].dtype
        self._code = _DTYPES[self.dtype]
        self.ffn = ffn
        self._fn = lib.ef_q4_swiglu
        self._lib = lib

    def __call__(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """``[len(slots), hidden]`` in the dtype of the scales, for ``x [hidden]``."""
        if x.dtype != self.dtype or not x.is_contiguous():
            x = x.to(self.dtype).contiguous()
        hidden = x.shape[-1]
        n = len(slots)
        index = (ctypes.c_long * n)(*slots)
        y = torch.empty(n, hidden, dtype=self.dtype)
        code = self._code
        rc = self._fn(
            x.data_ptr(), code, hidden, self.ffn, n, ctypes.addressof(index), self._up, self._down, code,
            y.data_ptr(), code,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("the experts kernel could not allocate its buffers")
        return y

    def rows(self, x: torch.Tensor, groups: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Many rows through many experts in one call: ``groups`` holds ``(slot, rows of x [m, hidden])`` pairs,
        and the result ``[routes, hidden]`` holds each group's rows in turn. Each route's result is the one a
        one-row call gives for that row and slot (see ``ef_q4_swiglu_rows``)."""
        if x.dtype != self.dtype or not x.is_contiguous():
            x = x.to(self.dtype).contiguous()
        m, hidden = x.shape
        slots = [slot for slot, _ in groups]
        start = [0]
        flat: list[int] = []
        for _, members in groups:
            flat.extend(members)
            start.append(len(flat))
        if any(not 0 <= r < m for r in flat):
            raise IndexError(f"a route's row is outside the {m} rows given")
        slot_arr = (ctypes.c_long * len(slots))(*slots)
        start_arr = (ctypes.c_long * len(start))(*start)
        row_arr = (ctypes.c_long * max(1, len(flat)))(*flat)
        y = torch.empty(len(flat), hidden, dtype=self.dtype)
        if not flat:
            return y
        code = self._code
        rc = self._lib.ef_q4_swiglu_rows(
            x.data_ptr(), code, m, hidden, self.ffn, len(slots), ctypes.addressof(slot_arr),
            ctypes.addressof(start_arr), ctypes.addressof(row_arr), self._up, self._down, code, y.data_ptr(), code,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("the experts kernel could not allocate its buffers")
        return y
