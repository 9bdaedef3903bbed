"""Writers of pre-quantized checkpoint formats for tests, written from the published formats.

No library that writes GPTQ or AWQ installs on a CPU-only machine (AutoGPTQ, GPTQModel and AutoAWQ build CUDA
kernels), so these packers follow the formats as their projects document them, one value at a time (slow and
plain on purpose: nothing shared with the readers in ``expertflow.quant.formats``). compressed-tensors is
written by its own library.
"""

from __future__ import annotations

from pathlib import Path

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
    """What a GPTQ layer computes with, from its own definition: input channel ``k`` of output ``n`` is bits
    ``bits * (k % per)`` of ``qweight[k // per, n]``, minus its group's zero point, times its group's scale."""
    per = 32 // bits
    mask = (1 << bits) - 1
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"].long()
    in_f, out_f = qweight.shape[0] * per, qweight.shape[1]
    k, n = torch.arange(in_f), torch.arange(out_f)
    q = (qweight[k // per, :] >> (bits * (k % per)).to(torch.int32)[:, None]) & mask  # [in, out]
    z = (qzeros[:, n // per] >> (bits * (n % per)).to(torch.int32)[None, :]) & mask  # [groups, out]
    z = z + (1 if v1 else 0)
    return ((q - z[g_idx]).float() * scales[g_idx]).T.contiguous()


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
    n = torch.arange(out_f)
    nibble = torch.tensor([AWQ_PACK_ORDER.index(j) for j in range(8)])[
        n % 8
    ]  # where column n sits in its word
    q = (qweight[:, n // 8] >> (4 * nibble).to(torch.int32)[None, :]) & 0xF  # [in, out]
    z = (qzeros[:, n // 8] >> (4 * nibble).to(torch.int32)[None, :]) & 0xF  # [groups, out]
    g = torch.arange(in_f) // group_size
    return ((q - z[g]).float() * scales[g]).T.contiguous()


def quantize_checkpoint(
    src: Path,
    dst: Path,
    reference: Path,
    method: str,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = False,
    act_order: bool = False,
) -> None:
    """A pre-quantized copy of the checkpoint ``src`` at ``dst`` (every expert and attention linear quantized,
    ``quantization_config`` in its config), and at ``reference`` the same model with those weights replaced
    by the values the format defines (a dense checkpoint transformers loads as the reference)."""
    import json

    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    quantized: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for i, (name, value) in enumerate(sorted(tensors.items())):
        linear = name.endswith(".weight") and value.dim() == 2 and (".experts." in name or "_proj" in name)
        if not linear:
            quantized[name] = dense[name] = value
            continue
        base = name[: -len(".weight")]
        if method == "gptq":
            t = gptq_tensors(value.float(), bits, group_size, sym=sym, act_order=act_order, seed=i)
            deq = gptq_dequantized(t, bits)
            if not act_order:
                t.pop("g_idx")  # optional without act-order
        elif method == "awq":
            t = awq_tensors(value.float(), group_size)
            deq = awq_dequantized(t, group_size)
        elif method == "compressed-tensors":
            t, deq = compressed_tensors_linear(value.float(), bits, group_size, sym=sym)
        else:
            raise ValueError(method)
        quantized.update({f"{base}.{k}": v for k, v in t.items()})
        dense[name] = deq.to(value.dtype)
    dst.mkdir(parents=True)
    reference.mkdir(parents=True)
    save_file(quantized, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(reference / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(config))
    if method == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "desc_act": act_order,
            "sym": sym,
            "checkpoint_format": "gptq",
        }
    elif method == "compressed-tensors":
        weights: dict = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel"}
        if group_size > 0:
            weights.update(strategy="group", group_size=group_size)
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}
            },
            "ignore": ["lm_head"],
            "quantization_status": "compressed",
        }
    else:
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    (dst / "config.json").write_text(json.dumps(config))


def compressed_tensors_linear(
    w: torch.Tensor, bits: int, group_size: int, *, sym: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``w`` packed by compressed-tensors' own compressor (pack-quantized), and what its own decompressor makes
    of it (the reference)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    if group_size > 0:
        args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size
        )
        groups = w.view(w.shape[0], -1, group_size)
    else:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel")
        groups = w.view(w.shape[0], 1, -1)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme
    )
    reference = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    return dict(packed), reference
