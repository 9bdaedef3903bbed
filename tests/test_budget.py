"""The default host budget comes from the memory really available: cgroup v2/v1 limits, else MemAvailable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expertflow.config import StoreConfig
from expertflow.lab.decode import memory_cgroup
from expertflow.pipeline.budget import (
    RUNTIME_SLACK,
    MemoryReading,
    explicit_budget_warning,
    plan_host_budget,
    read_memory,
)
from expertflow.pipeline.sync import ExpertStore
from tests.store_helpers import write_moe_checkpoint

GiB = 1 << 30
MiB = 1 << 20


def _fake_proc(root: Path, cgroup_lines: str, mem_available_kib: int = 8 * 1024 * 1024) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    (proc / "meminfo").write_text(
        f"MemTotal:       {16 * 1024 * 1024} kB\nMemFree:        100 kB\nMemAvailable:   {mem_available_kib} kB\n"
    )
    return proc


def test_without_a_cgroup_limit_the_machine_memavailable_applies(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "0::/\n", mem_available_kib=3 * 1024 * 1024)
    reading = read_memory(proc, tmp_path / "cgroup")
    assert reading.cgroup_limit is None
    assert reading.available == 3 * GiB
    assert "MemAvailable" in reading.source


def test_cgroup_v2_limit_minus_anonymous_memory_is_what_is_available(tmp_path: Path) -> None:
    cg = tmp_path / "cgroup"
    (cg / "jobs" / "me").mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("memory\n")
    (cg / "jobs" / "memory.max").write_text(str(2 * GiB))  # the parent is tighter than the child
    (cg / "jobs" / "me" / "memory.max").write_text("max\n")
    (cg / "jobs" / "memory.stat").write_text(f"anon {300 * MiB}\nfile {500 * MiB}\n")
    proc = _fake_proc(tmp_path, "0::/jobs/me\n")
    reading = read_memory(proc, cg)
    assert reading.cgroup_limit == 2 * GiB
    assert reading.cgroup_anon == 300 * MiB and reading.cgroup_file == 500 * MiB
    assert reading.available == 2 * GiB - 300 * MiB  # page cache is reclaimable: not subtracted
    assert "v2" in reading.source


def test_under_a_limit_the_process_own_mapped_files_keep_their_room(tmp_path: Path) -> None:
    """The libraries' code the process runs is page cache charged to its group: a pool planned over it gets it
    evicted, and every token faults it back in (the 9.3 GB preset at 1 GiB decoded slower at the default budget
    than at a smaller one until this was measured)."""
    cg = tmp_path / "cgroup"
    (cg / "memory" / "bench").mkdir(parents=True)
    (cg / "memory" / "bench" / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    (cg / "memory" / "bench" / "memory.stat").write_text(f"cache {300 * MiB}\nrss {200 * MiB}\n")
    proc = _fake_proc(tmp_path, "4:memory:/bench\n")
    (proc / "self" / "status").write_text(
        "VmRSS:\t  409600 kB\nRssAnon:\t  307200 kB\nRssFile:\t  102400 kB\n"
    )
    reading = read_memory(proc, cg)
    assert reading.process_file == 100 * MiB
    assert reading.available == GiB - 200 * MiB - 100 * MiB
    # Without a limit, MemAvailable already leaves page cache in use to the kernel's judgement.
    (cg / "memory" / "bench" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert read_memory(proc, cg).available == 8 * GiB


def test_cgroup_v1_limit_is_read_and_the_no_limit_value_ignored(tmp_path: Path) -> None:
    cg = tmp_path / "cgroup"
    (cg / "memory" / "bench").mkdir(parents=True)
    (cg / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (cg / "memory" / "bench" / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    (cg / "memory" / "bench" / "memory.stat").write_text(f"cache {100 * MiB}\nrss {200 * MiB}\n")
    proc = _fake_proc(tmp_path, "4:memory:/bench\n0::/\n")
    reading = read_memory(proc, cg)
    assert reading.cgroup_limit == GiB and reading.available == GiB - 200 * MiB
    assert "v1" in reading.source


def test_the_plan_subtracts_other_weights_reads_and_a_margin_and_caps_at_the_experts() -> None:
    reading = MemoryReading(16 * GiB, 16 * GiB, GiB, 200 * MiB, 0, "memory cgroup v1 limit of /x")
    plan = plan_host_budget(4 * GiB, other_bytes=100 * MiB, io_bytes=50 * MiB, reading=reading)
    assert plan.host_bytes == GiB - 200 * MiB - 100 * MiB - 50 * MiB - RUNTIME_SLACK
    assert "cgroup" in plan.reason and "margin" in plan.reason
    roomy = MemoryReading(64 * GiB, 60 * GiB, None, None, None, "MemAvailable of the machine")
    assert plan_host_budget(4 * GiB, reading=roomy).host_bytes == 4 * GiB
    assert "every expert fits" in plan_host_budget(4 * GiB, reading=roomy).reason


def test_an_explicit_budget_that_cannot_fit_gets_a_warning_naming_the_numbers() -> None:
    reading = MemoryReading(16 * GiB, 16 * GiB, GiB, 200 * MiB, 0, "memory cgroup v1 limit of /x")
    message = explicit_budget_warning(750 * MiB, other_bytes=150 * MiB, reading=reading)
    assert message is not None and "750.00 MiB" in message and "824.00 MiB" in message
    assert explicit_budget_warning(300 * MiB, other_bytes=150 * MiB, reading=reading) is None


def test_a_store_without_a_budget_sizes_its_pool_from_the_machine(tmp_path: Path) -> None:
    root = write_moe_checkpoint(tmp_path / "moe")
    with ExpertStore(root, StoreConfig()) as store:
        # This machine has far more memory than the 24 experts: every expert gets a slot, and it says why.
        assert store.num_slots == len(store.layout.experts)
        assert "every expert fits" in store.budget.reason


_CHILD = """
import json, sys
from expertflow.pipeline.budget import read_memory
r = read_memory()
print(json.dumps({"limit": r.cgroup_limit, "available": r.available, "source": r.source}))
"""


def test_a_real_memory_cgroup_limit_is_seen_by_the_process_inside_it() -> None:
    try:
        cgroup = memory_cgroup(768 * MiB)
        group = cgroup.__enter__()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no writable cgroup v1 memory controller here: {exc}")
    try:
        assert group is not None
        child = subprocess.run(
            [sys.executable, "-c", _CHILD],
            preexec_fn=lambda: (group / "cgroup.procs").write_text("0"),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    finally:
        cgroup.__exit__(None, None, None)
    seen = json.loads(child.stdout)
    assert seen["limit"] == 768 * MiB
    assert 0 < seen["available"] < 768 * MiB  # the interpreter's own memory is already taken
    assert "v1" in seen["source"]
