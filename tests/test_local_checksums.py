"""The local copy's checksums of an unpacked checkpoint: computed on the first local read of each expert,
cached beside the checkpoint, never trusted once the checkpoint changed, and the only thing a daemon's
reply for an unpacked checkpoint is checked against. The cache lives in the user's cache directory, never in
the model's folder."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from expertflow import StoreConfig, open_async_store
from expertflow.cli import main as cli_main
from expertflow.tiers.checksum import spec_checksum
from expertflow.tiers.local_checksums import FILE_NAME, LocalChecksums, default_cache_dir, fill
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.server_helpers import daemon
from tests.store_helpers import write_moe_checkpoint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def local(tmp_path: Path) -> Path:
    return write_moe_checkpoint(tmp_path / "local")


def test_values_are_the_key_bound_checksums_of_the_local_bytes(local: Path) -> None:
    before = [p.name for p in local.iterdir()]
    layout = open_checkpoint(local)
    book = LocalChecksums.open(layout)
    try:
        assert fill(book) == len(layout.experts) and fill(book) == 0
    finally:
        book.close()
    assert book.path is not None and book.path.parent == default_cache_dir()
    assert not (local / FILE_NAME).exists() and sorted(p.name for p in local.iterdir()) == sorted(before)
    with NvmeTier(layout, "mmap") as tier:
        for key in sorted(layout.experts):
            assert book.get(key) == spec_checksum(layout.spec(key), tier.read_expert(key))
    again = LocalChecksums.open(open_checkpoint(local))
    assert again.loaded == len(layout.experts) and again.recorded == 0
    again.close()


def test_a_checkpoint_edited_in_place_starts_a_fresh_cache(local: Path) -> None:
    book = LocalChecksums.open(open_checkpoint(local))
    fill(book)
    book.close()
    weights = local / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, rewritten
    fresh = LocalChecksums.open(open_checkpoint(local))
    assert len(fresh) == 0 and fresh.loaded == 0
    fresh.close()
    assert fresh.path is not None and fresh.path.read_text().count("\n") == 1  # only the new header


def test_a_torn_line_junk_and_disagreeing_values_are_not_trusted(local: Path) -> None:
    layout = open_checkpoint(local)
    book = LocalChecksums.open(layout)
    fill(book)
    book.close()
    keys = layout.keys()
    assert book.path is not None
    lines = book.path.read_text().split("\n")
    header, body = lines[0], [ln for ln in lines[1:] if ln]
    disagree = f"{keys[1].layer} {keys[1].expert} {0:016x}"
    torn = body[2][:-3]  # a crash in the middle of an append
    junk = ["not a line", "99 99 0123456789abcdef", f"{keys[3].layer} {keys[3].expert} xyz"]
    kept = [ln for ln in body if not ln.startswith((f"{keys[2].layer} {keys[2].expert} ",))]
    book.path.write_text("\n".join([header, *kept, disagree, *junk, torn]))
    again = LocalChecksums.open(layout)
    try:
        assert again.get(keys[0]) == book.get(keys[0])
        assert again.get(keys[1]) is None  # two values: neither is trusted, it is computed again
        assert again.get(keys[2]) is None  # only its torn line was left
        assert again.get(keys[3]) == book.get(keys[3])  # the junk line for it changes nothing
        assert len(again) == len(layout.experts) - 2
    finally:
        again.close()


def test_the_cache_follows_xdg_cache_home_and_an_unusable_one_keeps_values_in_memory(
    local: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXPERTFLOW_CACHE_DIR", raising=False)  # it would come first (core.cache_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    layout = open_checkpoint(local)
    book = LocalChecksums.open(layout)
    fill(book)
    book.close()
    assert book.path is not None and book.path.is_relative_to(tmp_path / "cache" / "expertflow" / "checksums")
    assert LocalChecksums.open(layout).loaded == len(layout.experts)
    (tmp_path / "blocked").write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    memory = LocalChecksums.open(layout)
    assert memory.path is None and fill(memory) == len(layout.experts)  # still checked, for this run
    memory.close()


def test_the_checksums_cli_fills_the_cache_and_says_so_for_a_pack(
    local: Path, tmp_path: Path, capsys
) -> None:
    from expertflow.tiers.pack import pack_checkpoint

    assert cli_main(["checksums", str(local)]) == 0
    n = len(open_checkpoint(local).experts)
    assert f"{n} expert checksums computed, 0 already known" in capsys.readouterr().out
    assert cli_main(["checksums", str(local)]) == 0
    assert f"0 expert checksums computed, {n} already known" in capsys.readouterr().out
    packed = pack_checkpoint(local, tmp_path / "packed", progress=False)
    assert not (packed / FILE_NAME).exists()  # a pack has its own checksums; the cache is not copied
    assert cli_main(["checksums", str(packed)]) == 0
    assert "is a pack" in capsys.readouterr().out


async def test_a_daemon_serves_an_expert_once_its_local_checksum_is_known(
    local: Path, tmp_path: Path
) -> None:
    """First read of each expert: local (recording its checksum), and the daemon is not asked. Afterwards,
    in this store and in the next one, the daemon serves it and its reply is checked against that value."""
    served = shutil.copytree(local, tmp_path / "served")
    layout = open_checkpoint(local)
    keys = layout.keys()
    slot = -(-layout.max_expert_nbytes // 4096) * 4096
    config = StoreConfig(host_bytes=4 * slot, predictor="none", remote_timeout=10)
    with daemon(served) as proc:
        config = dataclasses.replace(config, remote=(proc.address,))
        store = await open_async_store(layout, config)
        try:
            for group in (keys[:4], keys[4:8], keys[:4]):  # four slots: the third group was evicted
                store.release(await store.fetch(group))
            stats = store.stats()
        finally:
            await store.aclose()
        assert stats.reads == {"nvme": 8, "remote": 4}
        assert stats.source_skips == {"remote": 8} and not stats.source_errors

        store = await open_async_store(open_checkpoint(local), config)  # the cache file carries over
        try:
            store.release(await store.fetch(keys[4:8]))
            assert store.stats().reads == {"remote": 4}
        finally:
            await store.aclose()
