"""The benchmarks run end to end on small configurations and write honest, complete reports."""

from __future__ import annotations

import json

import pytest

from expertflow.lab.checkpoints import PRESETS, ExpertShape, write_expert_file
from expertflow.lab.report import BenchResult, markdown_table
from expertflow.lab.tiers import bench_tiers, dd_direct, memcpy, read_experts
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.safetensors_index import open_checkpoint

SMALL = ExpertShape("test", hidden=64, intermediate=128, experts=4, layers=3, top_k=2)


def test_bench_checkpoint_has_real_family_expert_shapes(tmp_path):
    root = write_expert_file(
        tmp_path / "ck", SMALL, total_bytes=10 * SMALL.expert_nbytes, shard_bytes=4 * SMALL.expert_nbytes
    )
    layout = open_checkpoint(root)
    assert len(layout.experts) == 10
    assert len(layout.files) == 3  # sharded with an index, like save_pretrained output
    assert layout.max_expert_nbytes == SMALL.expert_nbytes
    assert PRESETS["mixtral-8x7b"].expert_nbytes == 3 * 4096 * 14336 * 2


def test_read_experts_moves_every_byte_of_every_expert(tmp_path):
    layout = open_checkpoint(write_expert_file(tmp_path / "ck", SMALL, 6 * SMALL.expert_nbytes))
    for mode in ("mmap", "direct"):
        with NvmeTier(layout, mode) as tier:
            t = read_experts(tier, layout.keys(), concurrency=2)
        assert t.nbytes == layout.expert_bytes and len(t.latencies) == 6


def test_read_experts_moves_every_byte_of_a_quantized_pack(tmp_path):
    """A quantized pack's experts are not a whole number of 4 KiB blocks: buffers are sized as slots are."""
    from expertflow.lab.decode import build_preset, quantized_pack

    src = build_preset("tiny", tmp_path / "work", log=lambda _: None)
    layout = open_checkpoint(quantized_pack(src, "int4", tmp_path / "work", log=lambda _: None))
    assert layout.max_expert_nbytes % 4096 and layout.quantization is not None
    for mode in ("mmap", "direct"):
        with NvmeTier(layout, mode) as tier:
            t = read_experts(tier, layout.keys(), concurrency=4)
        assert t.nbytes == layout.expert_bytes and len(t.latencies) == len(layout.experts)


def test_limits_are_measured_on_the_same_bytes(tmp_path):
    layout = open_checkpoint(write_expert_file(tmp_path / "ck", SMALL, 6 * SMALL.expert_nbytes))
    dd = dd_direct(list(layout.files), SMALL.expert_nbytes)
    if dd is None:
        pytest.skip("dd with iflag=direct is not available here")
    assert dd.nbytes >= layout.expert_bytes
    assert memcpy(1 << 16, 8).nbytes == 8 << 16


def test_bench_tiers_writes_table_json_and_plot(tmp_path):
    result = bench_tiers(
        model=None,
        preset="olmoe-1b-7b",
        size_bytes=40 << 20,
        workdir=tmp_path / "work",
        out_dir=tmp_path / "out",
        concurrency=2,
        remote=True,
        log=lambda _: None,
    )
    paths = {r["path"] for r in result.rows}
    assert {"nvme direct qd=1", "nvme direct qd=2", "nvme mmap cold qd=2", "nvme mmap warm qd=2"} <= paths
    # The remote tier through a real daemon, each transport beside raw ZeroMQ of the same message size.
    assert {
        "remote tcp qd=2",
        "remote ipc qd=2",
        "zmq PUSH/PULL tcp (limit)",
        "zmq PUSH/PULL ipc (limit)",
    } <= paths
    remote = {r["path"]: r for r in result.rows if r["path"].startswith("remote")}
    assert all(r["limit_GB/s"] > 0 and r["GB/s"] > 0 for r in remote.values())
    for r in result.rows:
        if r["limit"]:
            assert r["fraction"] == pytest.approx(r["GB/s"] / r["limit_GB/s"])
    data = json.loads((tmp_path / "out" / "tiers.json").read_text())
    assert data["machine"]["cpus"] and data["command"] and data["rows"]
    assert any("cold page cache" in n for n in data["notes"])
    assert (tmp_path / "out" / "tiers.png").stat().st_size > 1000
    assert "| path |" in (tmp_path / "out" / "tiers.md").read_text()


def test_markdown_table_formats_rows():
    table = markdown_table([{"a": 1.23456, "b": "x"}, {"a": 12345.6, "b": None}])
    assert table.splitlines()[0] == "| a | b |"
    assert "1.23" in table and "12,346" in table


def test_bench_result_records_summary_and_notes(tmp_path):
    r = BenchResult("x", [{"k": 1}], notes=["method"], summary={"ratio": 2.0})
    r.write(tmp_path)
    md = (tmp_path / "x.md").read_text()
    assert "- ratio: 2.0" in md and "- method" in md


def test_bench_decode_runs_every_contender_with_identical_tokens(tmp_path):
    """Tiny preset, one budget: peers and ExpertFlow run in subprocesses and agree token for token."""
    from expertflow.lab.decode import Contender, bench_decode, build_preset

    root = build_preset("tiny", tmp_path / "work", log=lambda _: None)
    contenders = [
        Contender("transformers (RAM)", "transformers"),
        Contender("accelerate disk offload", "accelerate"),
        Contender("expertflow lru", "expertflow", 0.5, "lru", "none"),
    ]
    result = bench_decode(
        str(root), contenders=contenders, new_tokens=4, workdir=tmp_path / "work", log=lambda _: None
    )
    rows = {r["label"]: r for r in result.rows}
    assert all("error" not in r for r in rows.values()), rows
    assert all(r["same_tokens_as_transformers"] for r in rows.values())
    ef = rows["expertflow lru @50%"]
    assert ef["MiB_read_per_token"] > 0 and ef["bound_ms_per_token"] > 0
    assert ef["stats"]["device_misses"] > 0
    assert "expertflow lru @50% / accelerate" in result.summary


def test_a_warmed_up_contender_with_room_for_every_expert_decodes_all_resident(tmp_path):
    """--warmup generates once before the measured run, as llama-bench does: with a budget holding every
    expert the measured run reads nothing, and its token time is split into kernels, store and the rest."""
    from expertflow.lab.decode import Contender, bench_decode, build_preset

    root = build_preset("tiny", tmp_path / "work", log=lambda _: None)
    result = bench_decode(
        str(root),
        contenders=[Contender("expertflow lru", "expertflow", 1.0, "lru", "none")],
        new_tokens=4,
        warmup=4,
        workdir=tmp_path / "work",
        log=lambda _: None,
    )
    (row,) = result.rows
    assert "error" not in row, row
    assert row["hit_rate"] == 1.0 and row["stats"]["device_misses"] == 0
    parts = [row[k] for k in ("experts_compute_ms_per_token", "store_ms_per_token", "rest_ms_per_token")]
    assert all(p >= 0 for p in parts) and sum(parts) <= row["ms_per_token"] * 1.01
    assert row["prefill_tokens_per_second"] > 0
    assert any("generated 4 tokens once before" in n for n in result.notes)


def test_rounds_alternate_the_contenders_order():
    from expertflow.lab.decode import default_contenders, round_order

    contenders = default_contenders([0.25], ["lru", "predictive"])
    orders = [[c.label for c in round_order(contenders, i)] for i in range(3)]
    assert orders[0] == orders[2] == ["expertflow lru @25%", "expertflow predictive @25%"]
    assert orders[1] == orders[0][::-1]


def test_paired_ratios_compare_each_policy_with_lru_at_its_budget_round_by_round():
    """A slow round slows both contenders: ratios are taken within a round, then their median."""
    from expertflow.lab.decode import default_contenders, paired_ratios

    contenders = default_contenders([0.25, 0.1], ["lru", "predictive"]) + default_contenders(
        [0.5], ["predictive"]
    )
    lru, pred = "expertflow lru @25%", "expertflow predictive @25%"
    rounds = [
        {lru: 4.0, pred: 4.4, "expertflow lru @10%": 3.0, "expertflow predictive @10%": 2.7},
        {lru: 2.0, pred: 1.9},  # a slow round: best-of and median comparisons would mix it with fast ones
        {lru: 3.0, pred: 3.3, "expertflow predictive @50%": 9.0},
    ]
    out = paired_ratios(contenders, rounds)
    assert out[f"{pred} / {lru} (paired)"] == {
        "median": 1.1,
        "min": 0.95,
        "max": 1.1,
        "rounds": 3,
        "rounds_at_or_above": 2,
    }
    assert out["expertflow predictive @10% / expertflow lru @10% (paired)"]["rounds"] == 1
    assert not any("@50%" in k for k in out)  # no LRU run at that budget to compare with


def test_bench_decode_runs_quantized_contenders_on_a_pack_it_builds(tmp_path):
    """``lru-int4``: the bench quantizes the checkpoint once, runs on it, and reads a quarter of the bytes."""
    from expertflow.lab.decode import bench_decode, build_preset, default_contenders

    root = build_preset("tiny", tmp_path / "work", log=lambda _: None)
    contenders = default_contenders([0.5], ["lru", "lru-int4"])
    assert [c.label for c in contenders] == ["expertflow lru @50%", "expertflow lru int4 @50%"]
    result = bench_decode(
        str(root), contenders=contenders, new_tokens=4, workdir=tmp_path / "work", log=lambda _: None
    )
    rows = {r["label"]: r for r in result.rows}
    assert all("error" not in r for r in rows.values()), rows
    full, int4 = rows["expertflow lru @50%"], rows["expertflow lru int4 @50%"]
    assert 0 < int4["MiB_read_per_token"] < 0.35 * full["MiB_read_per_token"]
    assert int4["experts_compute_ms_per_token"] > 0 and "bound_ms_per_token" not in int4
    (pack,) = (tmp_path / "work").glob("mixtral-tiny-int4-g128-*")
    assert (pack / "expertflow-manifest.json").is_file()
    assert any("int4 pack" in n for n in result.notes)


def test_widened_experts_compute_and_route_as_the_source_model(tmp_path) -> None:
    """The learned-routing preset's builder: experts widened by units with zero output weights give the source
    model's logits and its routing at every layer, and ExpertFlow runs the widened checkpoint like transformers."""
    import torch
    from transformers import MixtralForCausalLM

    from expertflow.config import StoreConfig
    from expertflow.lab.decode import widen_experts
    from expertflow.model.loader import load_model
    from tests.checkpoints import save_checkpoint

    source = save_checkpoint("mixtral", tmp_path / "narrow", shard_size=None)
    narrow = MixtralForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    units = narrow.config.intermediate_size
    wide_dir = widen_experts(source, tmp_path / "wide", 3 * units, dtype="float32")
    wide = MixtralForCausalLM.from_pretrained(wide_dir, dtype=torch.float32).eval()
    assert wide.config.intermediate_size == 3 * units
    assert wide.model.layers[0].mlp.experts.down_proj.shape[-1] == 3 * units
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])
    with torch.no_grad():
        a = narrow(ids, output_router_logits=True)
        b = wide(ids, output_router_logits=True)
    scale = a.logits.abs().max().item()
    assert (a.logits - b.logits).abs().max() <= 1e-5 * scale
    for ra, rb in zip(a.router_logits, b.router_logits):
        assert torch.equal(ra.topk(2).indices, rb.topk(2).indices)
    with load_model(wide_dir, config=StoreConfig(host_bytes=None)) as model, torch.no_grad():
        assert (model(ids).logits - b.logits).abs().max() <= 1e-5 * scale


def test_widening_refuses_what_is_not_a_mixtral_checkpoint(tmp_path) -> None:
    from expertflow.errors import ConfigError
    from expertflow.lab.decode import widen_experts

    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        widen_experts(tmp_path / "nowhere", tmp_path / "wide", 1024)
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    with pytest.raises(ConfigError, match="not 'qwen2_moe'"):
        widen_experts(tmp_path / "qwen", tmp_path / "wide", 1024)
    assert not (tmp_path / "wide").exists() and not (tmp_path / "wide.partial").exists()


def test_two_checkpoints_of_one_folder_name_get_their_own_quantized_packs(tmp_path) -> None:
    """Packs in a work folder are keyed by what they were built from: two different checkpoints both named
    ``vlm``, and one rewritten in place, each get their own int4 experts (not the first one's)."""
    from expertflow.lab.decode import quantized_pack
    from tests.checkpoints import save_checkpoint

    a = save_checkpoint("mixtral", tmp_path / "a" / "vlm", seed=1, shard_size=None)
    b = save_checkpoint("mixtral", tmp_path / "b" / "vlm", seed=2, shard_size=None)
    work = tmp_path / "work"
    pack_a = quantized_pack(a, "int4", work, log=lambda _: None)
    pack_b = quantized_pack(b, "int4", work, log=lambda _: None)
    assert pack_a != pack_b
    assert quantized_pack(a, "int4", work, log=lambda _: None) == pack_a  # built once

    def first_expert(pack) -> bytes:
        layout = open_checkpoint(pack)
        with NvmeTier(layout, "mmap") as tier:
            buf = memoryview(bytearray(tier.buffer_nbytes()))
            n = tier.read_into(layout.keys()[0], buf)
            return bytes(buf[:n])

    assert first_expert(pack_a) != first_expert(pack_b)
    save_checkpoint("mixtral", a, seed=3, shard_size=None)  # rebuilt in place
    pack_a2 = quantized_pack(a, "int4", work, log=lambda _: None)
    assert pack_a2 not in (pack_a, pack_b)
    assert first_expert(pack_a2) not in (first_expert(pack_a), first_expert(pack_b))


def test_a_contenders_row_keeps_its_fastest_decode_and_its_fastest_prefill() -> None:
    from expertflow.lab.decode import _keep

    best: dict = {}
    _keep(best, {}, {"label": "x", "tokens_per_second": 10.0, "prefill_tokens_per_second": 90.0})
    _keep(best, {}, {"label": "x", "tokens_per_second": 12.0, "prefill_tokens_per_second": 50.0})
    _keep(best, {}, {"label": "x", "error": "exit 1"})
    assert best["x"]["tokens_per_second"] == 12.0 and best["x"]["prefill_tokens_per_second"] == 90.0
