"""Readers of pre-quantized formats (GPTQ, AWQ GEMM, compressed-tensors): the codes, scales and zeros they
recover compute exactly what the format defines, through the kernel layout."""

from __future__ import annotations

import pytest
import torch

from expertflow.errors import CheckpointError
from expertflow.quant.formats import read_awq, read_compressed, read_gptq, to_kernel_parts
from expertflow.quant.kernels import qlinear
from expertflow.quant.scheme import dequantize
from tests.quant_fixtures import awq_dequantized, awq_tensors, gptq_dequantized, gptq_tensors

W = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))


def test_a_gptq_word_holds_eight_input_channels_lowest_nibble_first() -> None:
    """The format by hand: channels 0..7 of output 0 with codes 0..7 pack to 0x76543210; eight zero points of 8
    are stored (v1: minus one) as 0x77777777."""
    qweight = torch.zeros(1, 8, dtype=torch.int32)
    qweight[0, 0] = 0x76543210
    t = {
        "qweight": qweight,
        "qzeros": torch.tensor([[0x77777777]], dtype=torch.int32),
        "scales": torch.ones(1, 8, dtype=torch.float16),
    }
    got = read_gptq(t, bits=4, group_size=-1, v1=True, name="x", where="f")
    assert got.codes[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and not got.codes[1:].any()
    assert got.dequantize()[0].tolist() == [-8, -7, -6, -5, -4, -3, -2, -1]


def test_an_awq_word_holds_eight_output_columns_in_awq_order() -> None:
    """Nibble i of an AWQ word is column (0, 2, 4, 6, 1, 3, 5, 7)[i]: codes 0..7 by column pack to 0x75316420."""
    t = {
        "qweight": torch.tensor([[0x75316420]], dtype=torch.int32),
        "qzeros": torch.zeros(1, 1, dtype=torch.int32),
        "scales": torch.ones(1, 8, dtype=torch.float16),
    }
    got = read_awq(t, group_size=1, name="x", where="f")
    assert got.codes.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_weights_read_as_the_format_defines_them(
    bits: int, sym: bool, act_order: bool, v1: bool
) -> None:
    t = gptq_tensors(W, bits, 64, sym=sym, act_order=act_order, v1=v1)
    got = read_gptq(t, bits=bits, group_size=64, v1=v1, name="l", where="f")
    assert torch.equal(got.dequantize(), gptq_dequantized(t, bits, v1=v1))


def test_gptq_4bit_runs_on_the_int4_kernel_with_the_same_values_act_order_included() -> None:
    for act_order in (False, True):
        t = gptq_tensors(W, 4, 64, sym=False, act_order=act_order)
        want = gptq_dequantized(t, 4)
        scheme, parts = to_kernel_parts(
            read_gptq(t, bits=4, group_size=64, v1=True, name="l", where="f"),
            torch.float32,
            name="l",
            where="f",
        )
        assert scheme.act_order == act_order
        # Zero points become float zeros: exact up to one rounding of (8 - z) * s.
        deq = dequantize(parts, scheme, 48, 256)
        assert (deq - want).abs().max() <= 1e-6 * want.abs().max()
        x = torch.randn(3, 256)
        y = qlinear(x, parts, scheme, 48, 256)
        assert (y - x @ want.T).abs().max() <= 1e-5 * (x @ want.T).abs().max()


def test_awq_weights_read_as_the_format_defines_them() -> None:
    t = awq_tensors(W, 64)
    got = read_awq(t, group_size=64, name="l", where="f")
    assert torch.equal(got.dequantize(), awq_dequantized(t, 64))


def test_a_g_idx_that_is_not_a_permutation_of_the_groups_is_refused_by_name() -> None:
    t = gptq_tensors(W, 4, 64, sym=True, act_order=True)
    t["g_idx"] = t["g_idx"].clone()
    t["g_idx"][:5] = 0  # group 0 now has more channels than 64, another fewer
    with pytest.raises(CheckpointError, match="not a permutation of the groups") as info:
        read_gptq(t, bits=4, group_size=64, v1=True, name="layers.0.w1", where="model.safetensors")
    assert info.value.tensor == "layers.0.w1.g_idx" and info.value.file == "model.safetensors"


def test_nan_scales_are_refused_naming_the_tensor() -> None:
    t = gptq_tensors(W, 4, 64, sym=True, act_order=False)
    t["scales"][0, 3] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        read_gptq(t, bits=4, group_size=64, v1=True, name="w1", where="f")
    assert info.value.tensor == "w1.scales"


def test_a_qweight_whose_shape_disagrees_with_bits_and_group_is_refused() -> None:
    t = gptq_tensors(W, 4, 64, sym=True, act_order=False)
    with pytest.raises(CheckpointError, match="disagree with 8 bits"):
        read_gptq(t, bits=8, group_size=64, v1=True, name="w1", where="f")


def test_8bit_in_groups_is_refused_with_the_reason() -> None:
    t = gptq_tensors(W, 8, 64, sym=True, act_order=False)
    w = read_gptq(t, bits=8, group_size=64, v1=True, name="w1", where="f")
    with pytest.raises(CheckpointError, match="groups of 64 are not supported"):
        to_kernel_parts(w, torch.float32, name="w1", where="f")


def test_compressed_tensors_pack_quantized_is_read_as_its_library_defines_it() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(-8, 8, (48, 256), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = pack_to_int32(codes, 4)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([48, 256])), codes)
    scale = torch.rand(48, 4) + 0.1
    got = read_compressed(
        {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([48, 256])},
        bits=4,
        group_size=64,
        symmetric=True,
        name="l",
        where="f",
    )
    want = codes.float() * scale.repeat_interleave(64, dim=1)
    assert torch.equal(got.dequantize(), want)


def test_act_order_groups_the_kernel_cannot_take_are_cut_within_each_group() -> None:
    """GPTQ groups of 512 run as kernel groups of 256 sharing the group's scale and zero; with act-order each
    group's channels are scattered over the input, and still compute exactly the format's values."""
    w = torch.randn(48, 1024, generator=torch.Generator().manual_seed(3))
    t = gptq_tensors(w, 4, 512, sym=False, act_order=True, seed=3)
    want = gptq_dequantized(t, 4)
    scheme, parts = to_kernel_parts(
        read_gptq(t, bits=4, group_size=512, v1=True, name="l", where="f"), torch.float32, name="l", where="f"
    )
    assert scheme.group_size == 256 and scheme.act_order
    assert (dequantize(parts, scheme, 48, 1024) - want).abs().max() <= 1e-6 * want.abs().max()
