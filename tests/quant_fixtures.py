"""Writers of pre-quantized checkpoint formats for tests, written from the published formats.

No library that writes GPTQ or AWQ installs on a CPU-only machine (AutoGPTQ, GPTQModel and AutoAWQ build CUDA
kernels), so these packers follow the formats as their projects document them, one value at a time (slow and
plain on purpose: nothing shared with the readers in ``expertflow.quant.formats``). compressed-tensors is
written by its own library.
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, *, sym: bool, g_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of ``w`` ([out, in]) per group: (codes [out, in], scales [G, out], zeros [G, out], g_idx)."""
    out_f, in_f = w.shape
    size = in_f if group_size <= 0 else group_size
    groups = in_f // size
    g = torch.arange(in_f) // size if g_idx is None else g_idx
    maxq = (1 << bits) - 1
    scales = torch.empty(groups, out_f)
    zeros = torch.empty(groups, out_f, dtype=torch.int32)
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    for gi in range(groups):
        cols = (g == gi).nonzero().flatten()
        block = w[:, cols]
        if sym:
            s = block.abs().amax(dim=1).clamp(min=1e-8) / ((maxq + 1) / 2 - 0.5)
            z = torch.full((out_f,), (maxq + 1) // 2, dtype=torch.int32)
        else:
            lo, hi = block.amin(dim=1).clamp(max=0), block.amax(dim=1).clamp(min=0)
            s = ((hi - lo) / maxq).clamp(min=1e-8)
            z = torch.round(-lo / s).to(torch.int32).clamp(0, maxq)
        scales[gi] = s
        zeros[gi] = z
        codes[:, cols] = torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, maxq).to(torch.int32)
    return codes, scales, zeros, g


def _pack_int32(values: list[int], bits: int) -> int:
    word = 0
    for i, v in enumerate(values):
        word |= (int(v) & ((1 << bits) - 1)) << (bits * i)
    return word - (1 << 32) if word >= 1 << 31 else word  # as a signed int32


def gptq_tensors(
    w: torch.Tensor, bits: int, group_size: int, *, sym: bool, act_order: bool, v1: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``qweight`` [in*bits/32, out], ``qzeros`` [G, out*bits/32] (v1: zero - 1), ``scales`` [G, out] fp16,
    ``g_idx`` [in] of ``w`` ([out, in]) in AutoGPTQ's format; act-order assigns channels to groups in a random
    order (as activation order does)."""
    out_f, in_f = w.shape
    per = 32 // bits
    size = in_f if group_size <= 0 else group_size
    g_idx = torch.arange(in_f) // size
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))]
    codes, scales, zeros, _ = quantize_groups(w, bits, group_size, sym=sym, g_idx=g_idx)
    scales = scales.to(torch.float16)
    qweight = torch.empty(in_f // per, out_f, dtype=torch.int32)
    for r in range(in_f // per):
        for n in range(out_f):
            qweight[r, n] = _pack_int32(codes[n, r * per : (r + 1) * per].tolist(), bits)
    stored = zeros - (1 if v1 else 0)
    qzeros = torch.empty(zeros.shape[0], out_f // per, dtype=torch.int32)
    for gi in range(zeros.shape[0]):
        for c in range(out_f // per):
            qzeros[gi, c] = _pack_int32(stored[gi, c * per : (c + 1) * per].tolist(), bits)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}


def gptq_dequantized(t: dict[str, torch.Tensor], bits: int, v1: bool = True) -> torch.Tensor:
    """What a GPTQ layer computes with, from its own definition: ``(q - z) * s`` per input channel's group."""
    per = 32 // bits
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"].long()
    in_f, out_f = qweight.shape[0] * per, qweight.shape[1]
    w = torch.empty(out_f, in_f)
    mask = (1 << bits) - 1
    for k in range(in_f):
        q = (qweight[k // per] >> (bits * (k % per))) & mask
        g = int(g_idx[k])
        z = torch.stack([(qzeros[g, n // per] >> (bits * (n % per))) & mask for n in range(out_f)])
        w[:, k] = (q - (z + (1 if v1 else 0))).float() * scales[g]
    return w


def awq_tensors(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """``qweight`` [in, out/8], ``qzeros`` [G, out/8] in AWQ's GEMM packing order, ``scales`` [G, out] fp16."""
    out_f, in_f = w.shape
    codes, scales, zeros, _ = quantize_groups(w, 4, group_size, sym=False)
    qweight = torch.empty(in_f, out_f // 8, dtype=torch.int32)
    for k in range(in_f):
        for c in range(out_f // 8):
            qweight[k, c] = _pack_int32([codes[c * 8 + AWQ_PACK_ORDER[i], k] for i in range(8)], 4)
    qzeros = torch.empty(zeros.shape[0], out_f // 8, dtype=torch.int32)
    for gi in range(zeros.shape[0]):
        for c in range(out_f // 8):
            qzeros[gi, c] = _pack_int32([zeros[gi, c * 8 + AWQ_PACK_ORDER[i]] for i in range(8)], 4)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.to(torch.float16)}


def awq_dequantized(t: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """What an AWQ GEMM layer computes with: ``(q - z) * s``, nibble ``i`` of a word holding column
    ``8c + AWQ_PACK_ORDER[i]``."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"].float()
    in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty(out_f, in_f)
    for k in range(in_f):
        g = k // group_size
        for c in range(out_f // 8):
            for i in range(8):
                n = c * 8 + AWQ_PACK_ORDER[i]
                q = (int(qweight[k, c]) >> (4 * i)) & 0xF
                z = (int(qzeros[g, c]) >> (4 * i)) & 0xF
                w[n, k] = (q - z) * float(scales[g, n])
    return w
