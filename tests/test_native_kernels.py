"""ExpertFlow's own quantized matrix-vector kernels: the arithmetic they promise, on the layouts packs hold, and
the fall-back to torch's kernels where they cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from expertflow.config import StoreConfig
from expertflow.model.generate import format_summary, generate, quantized_kernels
from expertflow.model.loader import load_model, plan_model
from expertflow.model.quantize_pack import pack_quantized
from expertflow.model.quantized_experts import FusedRoutes
from expertflow.quant import kernels, native
from expertflow.quant.scheme import QuantScheme, dequantize, quantize, unpack_int4
from tests.checkpoints import save_checkpoint


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(native.ENV, raising=False)
    native.reset()
    yield
    native.reset()


def _native_or_skip() -> None:
    if native.library() is None:
        pytest.skip(native.status())


def _quantize_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization, written out: int8 codes, per-block scales and exact sums (fp32)."""
    xb = x.float().view(x.shape[0], -1, block)
    scale = xb.abs().amax(dim=-1) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return codes.to(torch.int64), scale, xb.sum(dim=-1)


def _int4_reference(
    x: torch.Tensor, parts: dict[str, torch.Tensor], n: int, k: int, group: int
) -> torch.Tensor:
    """sum over groups of scale * xs * (sum q qx - 8 sum qx) + zero * sum x: what the int4 kernel computes."""
    codes = unpack_int4(parts["qweight"], n, k).to(torch.int64).view(n, k // group, group)
    qx, xs, xsum = _quantize_rows(x, group)
    dots = torch.einsum("ngk,mgk->mng", codes, qx) - 8 * qx.sum(-1)[:, None, :]
    scale, zero = parts["qparams"].float().unbind(-1)  # [groups, n]
    y = (scale.T[None] * dots.double().float() * xs[:, None, :] + zero.T[None] * xsum[:, None, :]).sum(-1)
    return y


def _int8_reference(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    k = x.shape[1]
    pad = -k % 64
    qx, xs, _ = _quantize_rows(torch.nn.functional.pad(x.float(), (0, pad)), 64)
    w = torch.nn.functional.pad(parts["qweight"].to(torch.int64), (0, pad)).view(
        parts["qweight"].shape[0], -1, 64
    )
    dots = torch.einsum("nbk,mbk->mnb", w, qx).float()
    return (dots * xs[:, None, :]).sum(-1) * parts["scales"].float()[None]


INT4_SHAPES = [(256, 512, 128), (320, 256, 32), (48, 512, 64), (128, 1024, 256)]  # a tail of 64 and one of 48


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("n", "k", "group"), INT4_SHAPES)
def test_the_int4_kernel_computes_the_group_sums_of_int8_activations(
    dtype: torch.dtype, n: int, k: int, group: int
) -> None:
    _native_or_skip()
    torch.manual_seed(n + k)
    parts = quantize(torch.randn(n, k), QuantScheme(4, group), dtype)
    x = torch.randn(2, k).to(dtype)
    y = native.int4_matmul(x, parts["qweight"], parts["qparams"], group, n)
    assert y.dtype == dtype and y.shape == (2, n)
    ref = _int4_reference(x, parts, n, k, group)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the output's own rounding
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=tol, atol=tol * ref.abs().max().item())
    # Against the weight's exact product the cost is the activations' int8 rounding: under 2% of the output.
    exact = x.double() @ dequantize(parts, QuantScheme(4, group), n, k).double().T
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("n", "k"), [(200, 512), (64, 272), (3, 1024)])
def test_the_int8_kernel_computes_block_sums_of_int8_activations(dtype: torch.dtype, n: int, k: int) -> None:
    _native_or_skip()
    torch.manual_seed(n + k)
    parts = quantize(torch.randn(n, k), QuantScheme(8, 0), dtype)
    x = torch.randn(1, k).to(dtype)
    y = native.int8_matmul(x, parts["qweight"], parts["scales"])
    ref = _int8_reference(x, parts)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=tol, atol=tol * ref.abs().max().item())
    exact = x.double() @ (parts["qweight"].double() * parts["scales"].double()[:, None]).T
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2


def test_the_kernels_give_the_same_bits_on_any_number_of_threads() -> None:
    _native_or_skip()
    torch.manual_seed(0)
    p4 = quantize(torch.randn(1024, 1024), QuantScheme(4, 128), torch.bfloat16)
    p8 = quantize(torch.randn(1024, 1024), QuantScheme(8, 0), torch.bfloat16)
    x = torch.randn(1, 1024).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(
                (
                    native.int4_matmul(x, p4["qweight"], p4["qparams"], 128, 1024),
                    native.int8_matmul(x, p8["qweight"], p8["scales"]),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])


@pytest.mark.parametrize("bits", [4, 8])
def test_a_large_product_goes_to_the_native_kernel_with_each_rows_bits_its_own(bits: int) -> None:
    """Any number of rows (a decode step, a prefill, more than a chunk of 64) goes to the native kernel, and each
    row comes out with the bits it gets alone: batching rows changes no result. A small product stays on
    torch's kernel."""
    _native_or_skip()
    torch.manual_seed(0)
    scheme = QuantScheme(4, 128) if bits == 4 else QuantScheme(8, 0)
    n, k = 512, kernels.NATIVE_MIN_WEIGHTS // 512
    parts = quantize(torch.randn(n, k), scheme, torch.bfloat16)
    rows = torch.randn(70, k).to(torch.bfloat16)  # a chunk of 64, then a tile of 4, then 2 single rows

    def native_product(x: torch.Tensor) -> torch.Tensor:
        if bits == 4:
            return native.int4_matmul(x, parts["qweight"], parts["qparams"], 128, n)
        return native.int8_matmul(x, parts["qweight"], parts["scales"])

    together = kernels.qlinear(rows, parts, scheme, n, k)
    assert torch.equal(together, native_product(rows))
    for i in (0, 3, 4, 63, 64, 69):
        assert torch.equal(together[i], native_product(rows[i : i + 1])[0])
    small = quantize(torch.randn(64, 128), scheme, torch.bfloat16)
    x = torch.randn(3, 128).to(torch.bfloat16)
    if bits == 4:
        reference = torch.ops.aten._weight_int4pack_mm_for_cpu(x, small["qweight"], 128, small["qparams"])
    else:
        reference = torch._weight_int8pack_mm(x, small["qweight"], small["scales"])
    assert torch.equal(kernels.qlinear(x, small, scheme, 64, 128), reference)


def test_kernels_torch_sends_every_product_to_torchs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "torch")
    native.reset()
    torch.manual_seed(0)
    scheme = QuantScheme(8, 0)
    parts = quantize(torch.randn(1024, 1024), scheme, torch.bfloat16)
    x = torch.randn(1, 1024).to(torch.bfloat16)
    y = kernels.qlinear(x, parts, scheme, 1024, 1024)
    assert torch.equal(y, torch._weight_int8pack_mm(x, parts["qweight"], parts["scales"]))
    assert native.library() is None and "EXPERTFLOW_KERNELS=torch" in native.status()


def test_a_kernel_build_that_fails_falls_back_to_torchs_kernels_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    if not set(native.CPU_FLAGS) <= native._cpu_flags():
        pytest.skip("this CPU has no AVX-512 VNNI: the build is never tried")
    monkeypatch.setenv("EXPERTFLOW_CACHE_DIR", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "false")
    native.reset()
    scheme = QuantScheme(4, 128)
    parts = quantize(torch.randn(512, 512), scheme, torch.bfloat16)
    x = torch.randn(1, 512).to(torch.bfloat16)
    y = kernels.qlinear(x, parts, scheme, 512, 512)
    assert torch.equal(
        y, torch.ops.aten._weight_int4pack_mm_for_cpu(x, parts["qweight"], 128, parts["qparams"])
    )
    assert "building ExpertFlow's failed" in native.status()


def _stacks(slots: int, hidden: int, ffn: int, group: int, dtype: torch.dtype) -> tuple[list, list, list]:
    """Random int4 gate_up and down weights of ``slots`` experts, stacked as a slot arena holds them."""
    scheme = QuantScheme(4, group)
    weights, ups, downs = [], [], []
    for _ in range(slots):
        gate_up, down = torch.randn(2 * ffn, hidden) / hidden**0.5, torch.randn(hidden, ffn) / ffn**0.5
        ups.append(quantize(gate_up, scheme, dtype))
        downs.append(quantize(down, scheme, dtype))
        weights.append(
            (
                dequantize(ups[-1], scheme, 2 * ffn, hidden).double(),
                dequantize(downs[-1], scheme, hidden, ffn).double(),
            )
        )
    up = tuple(torch.stack([p[k] for p in ups]) for k in ("qweight", "qparams"))
    down = tuple(torch.stack([p[k] for p in downs]) for k in ("qweight", "qparams"))
    return weights, [*up, group], [*down, group]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_prompts_routes_in_one_call_give_each_row_the_bits_a_decode_step_gives_it(
    dtype: torch.dtype,
) -> None:
    """A prompt's routes, grouped by expert so that each weight is read once for all its rows, in one call: each
    route's result is the one-row (decode) kernel's for that row and slot, however the routes are grouped."""
    _native_or_skip()
    torch.manual_seed(1)
    hidden, ffn = 288, 224  # hidden 288: whole blocks of 64 rows and a tail of 32 in the down product
    weights, up, down = _stacks(5, hidden, ffn, 32, dtype)
    x = torch.randn(7, hidden).to(dtype)
    call = native.Int4Swiglu(tuple(up), tuple(down), ffn)
    # Groups of 5, 1, 7 rows and none: rows four at a time (one pass over a weight block) and the rest one by one.
    groups = [(3, [0, 2, 5, 6, 1]), (0, [4]), (4, [1, 2, 3, 4, 5, 6, 0]), (1, [])]
    together = call.rows(x, groups)
    other = [(4, [0, 1]), (3, [6, 5, 2, 1, 0]), (0, [4]), (4, [6, 5, 4, 3, 2])]
    regrouped = call.rows(x, other)
    assert together.shape == (13, hidden)
    routes = [(slot, r) for slot, members in groups for r in members]
    again = [(slot, r) for slot, members in other for r in members]
    for i, (slot, r) in enumerate(routes):
        alone = call(x[r], [slot])[0]
        assert torch.equal(together[i], alone), f"route {i} (row {r}, slot {slot})"
        assert torch.equal(regrouped[again.index((slot, r))], alone)
        w_up, w_down = weights[slot]
        gate, lin = (w_up @ x[r].double()).chunk(2)
        exact = w_down @ (torch.nn.functional.silu(gate) * lin)
        assert ((together[i].double() - exact).norm() / exact.norm()).item() < 3e-2
    with pytest.raises(IndexError):
        call.rows(x, [(0, [7])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_wave_of_experts_in_one_call_gives_each_expert_the_bits_it_gets_alone(dtype: torch.dtype) -> None:
    """The decode step's experts of a layer run as one call; an expert's output depends on its slot alone (which
    experts share the call, and in what order, changes no bit), and is the SwiGLU expert's to int8 rounding."""
    _native_or_skip()
    torch.manual_seed(0)
    hidden, ffn = 256, 192  # 2 * ffn = 384 rows: 6 blocks of 64; hidden 256: 4 blocks
    weights, up, down = _stacks(5, hidden, ffn, 64, dtype)
    x = torch.randn(hidden).to(dtype)
    call = native.Int4Swiglu(tuple(up), tuple(down), ffn)
    together = call(x, [3, 0, 4])
    reordered = call(x, [4, 3, 0])
    for row, slot in enumerate([3, 0, 4]):
        alone = call(x, [slot])
        assert torch.equal(together[row], alone[0])
        assert torch.equal(reordered[[1, 2, 0][row]], alone[0])
        w_up, w_down = weights[slot]
        gate, lin = (w_up @ x.double()).chunk(2)
        exact = w_down @ (torch.nn.functional.silu(gate) * lin)
        assert ((together[row].double() - exact).norm() / exact.norm()).item() < 3e-2


def _native_counting(monkeypatch: pytest.MonkeyPatch, method: str) -> list[int]:
    """Switch to the native kernels for every size (the fixtures' experts are small) and record the number of
    experts (slots or groups) each call of ``Int4Swiglu.<method>`` takes."""
    monkeypatch.setenv(native.ENV, "native")
    native.reset()
    calls: list[int] = []
    real = getattr(native.Int4Swiglu, method)
    monkeypatch.setattr(
        native.Int4Swiglu,
        method,
        lambda self, x, experts: calls.append(len(experts)) or real(self, x, experts),
    )
    return calls


def test_a_decode_step_runs_a_layers_experts_in_one_native_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the native kernels, each layer of a Mixtral int4 pack computes a decode step's experts in one call,
    and the step's logits are those of torch's kernels to the activations' int8 rounding."""
    _native_or_skip()
    src = save_checkpoint("mixtral", tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", QuantScheme(4, 32), progress=False)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])

    def step_logits() -> torch.Tensor:
        with load_model(pack, config=StoreConfig(predictor="none")) as model, torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            return model(input_ids=ids[:, -1:], past_key_values=cache).logits.float()

    monkeypatch.setenv(native.ENV, "torch")
    native.reset()
    reference = step_logits()
    calls = _native_counting(monkeypatch, "__call__")
    fused = step_logits()
    config = transformers.AutoConfig.from_pretrained(src)
    assert len(calls) >= config.num_hidden_layers  # one call per layer (or per wave) on the decode step
    assert sum(calls) >= config.num_hidden_layers * config.num_experts_per_tok
    assert not torch.equal(fused, reference)  # other kernels, other rounding...
    assert ((fused - reference).norm() / reference.norm()).item() < 2e-2  # ...of the activations only


def test_a_prompt_runs_each_waves_experts_in_one_native_call_with_the_bits_each_token_gets_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the native kernels, a prompt's routes go through a wave's experts in one call (each expert's weights
    read once for all its tokens): each token's result is the one it gets alone (a decode step's kernel), the
    same whatever the budget, and the logits are torch's kernels' to the activations' int8 rounding."""
    _native_or_skip()
    src = save_checkpoint("mixtral", tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", QuantScheme(4, 32), progress=False)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    monkeypatch.setenv(native.ENV, "torch")
    native.reset()
    with load_model(pack, config=StoreConfig(predictor="none")) as model, torch.no_grad():
        reference = model(input_ids=ids).logits.float()
    calls = _native_counting(monkeypatch, "rows")
    slot = plan_model(pack).slot_nbytes
    logits = []
    # Every expert resident; three slots (many waves, evictions); every expert resident, at most 3 routes a call.
    for host, per_call in ((None, 512), (3 * slot, 512), (None, 3)):
        monkeypatch.setattr(FusedRoutes, "ROWS_PER_CALL", per_call)
        with (
            load_model(pack, config=StoreConfig(predictor="none", host_bytes=host)) as model,
            torch.no_grad(),
        ):
            seen: list[tuple[torch.Tensor, ...]] = []
            layer = next(iter(model.expert_layers.values()))
            hook = layer.register_forward_hook(lambda m, args, out, seen=seen: seen.append((*args, out)))
            logits.append(model(input_ids=ids).logits.float())
            hook.remove()
            ((hidden, index, weights, together),) = seen
            for t in range(hidden.shape[0]):
                alone = layer(hidden[t : t + 1], index[t : t + 1], weights[t : t + 1])
                assert torch.equal(together[t : t + 1], alone), f"token {t}"
            if model.expert_store.holds_every_expert:  # again, on the slots its experts keep: no pins
                hits = model.expert_store.stats().device_hits
                assert torch.equal(model(input_ids=ids).logits.float(), logits[-1])
                assert model.expert_store.pinned() == [] and model.expert_store.stats().device_hits > hits
    config = transformers.AutoConfig.from_pretrained(src)
    assert len(calls) >= config.num_hidden_layers and max(calls) > 1  # a wave's experts in one call
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    assert not torch.equal(logits[0], reference)  # other kernels, other rounding...
    assert ((logits[0] - reference).norm() / reference.norm()).item() < 2e-2  # ...of the activations only


def test_the_summary_says_which_kernels_ran_a_quantized_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = save_checkpoint("mixtral", tmp_path / "src")
    pack = pack_quantized(src, tmp_path / "q", QuantScheme(4, 32), progress=False)
    monkeypatch.setenv(native.ENV, "torch")
    native.reset()
    with load_model(pack, config=StoreConfig(predictor="none")) as model:
        kernels_line = quantized_kernels(model)
        assert "EXPERTFLOW_KERNELS=torch" in kernels_line
        result = generate(model, [1, 2, 3], max_new_tokens=2)
        assert f"quantized products: {kernels_line}" in format_summary(result)
    with load_model(src, config=StoreConfig(predictor="none")) as model:
        assert quantized_kernels(model) == ""
        assert "quantized products" not in format_summary(generate(model, [1, 2, 3], max_new_tokens=2))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_linear_plans_its_product_once_with_qlinears_bits_and_replans_on_a_new_choice(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from expertflow.model.quantized_linear import QuantizedLinear

    _native_or_skip()
    torch.manual_seed(1)
    scheme = QuantScheme(8, 0) if bits == 8 else QuantScheme(4, 128)
    parts = quantize(torch.randn(1024, 1024), scheme, torch.bfloat16)
    module = QuantizedLinear(parts, scheme, 1024, 1024, None)
    x = torch.randn(2, 3, 1024).to(torch.bfloat16)
    y = module(x)
    assert module._fast is not None and module._fast[1] is not None  # the native plan
    assert torch.equal(y, kernels.qlinear(x, parts, scheme, 1024, 1024))
    assert torch.equal(module(x.float()), kernels.qlinear(x.float(), parts, scheme, 1024, 1024).float())
    monkeypatch.setenv(native.ENV, "torch")
    native.reset()  # a new kernel choice: the module must not keep calling the native kernel
    torch_y = module(x)
    assert module._fast[1] is None
    assert torch.equal(torch_y, kernels.qlinear(x, parts, scheme, 1024, 1024))
    assert not torch.equal(torch_y, y)  # torch's kernel rounds otherwise: the choice really changed
