"""Session fixtures: real tiny MoE checkpoints, built on first use and shared by every test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.checkpoints import FAMILIES, FamilyUnavailable, save_checkpoint

# The repository sits beside the shared directory (/work/main and /work/shared; CI clones the same way).
SHARED_MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-mixtral-pystdlib"


def pytest_configure(config: pytest.Config) -> None:
    """Family checks are cached in a folder of this session's own (a user's cache is never read or written;
    CLI subprocesses inherit it): each family is checked once per session, at its first load."""
    folder = tempfile.mkdtemp(prefix="expertflow-test-cache-")
    config.stash[_CACHE_KEY] = (folder, os.environ.get("EXPERTFLOW_CACHE_DIR"))
    os.environ["EXPERTFLOW_CACHE_DIR"] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder, before = config.stash.get(_CACHE_KEY, (None, None))
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    if before is None:
        os.environ.pop("EXPERTFLOW_CACHE_DIR", None)
    else:
        os.environ["EXPERTFLOW_CACHE_DIR"] = before


_CACHE_KEY = pytest.StashKey[tuple[str, "str | None"]]()


class CheckpointCache:
    """Saved tiny checkpoints under one directory, each built the first time a test asks for it.

    Tests must treat the returned directories as read-only; copy one before corrupting it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, bool], Path] = {}

    def get(self, family: str, sharded: bool = True) -> Path:
        """The checkpoint directory of ``family``: sharded with an index, or one ``model.safetensors``."""
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        key = (family, sharded)
        if key not in self._built:
            path = self.root / f"{family}-{'sharded' if sharded else 'single'}"
            try:
                save_checkpoint(family, path, shard_size="200KB" if sharded else None)
            except FamilyUnavailable as exc:
                pytest.skip(str(exc))
            self._built[key] = path
        return self._built[key]

    @property
    def mixtral_single_file(self) -> Path:
        """Mixtral saved as a single ``model.safetensors`` without an index (same weights as the sharded one)."""
        return self.get("mixtral", sharded=False)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> CheckpointCache:
    """Lazily built tiny checkpoints of every MoE family: ``checkpoints.get(family, sharded=True)``."""
    return CheckpointCache(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def mixtral_single_file(checkpoints: CheckpointCache) -> Path:
    """The tiny Mixtral checkpoint as one ``model.safetensors`` file, no index."""
    return checkpoints.mixtral_single_file


@pytest.fixture(scope="session")
def mixtral_dir(checkpoints: CheckpointCache) -> Path:
    """The tiny sharded Mixtral checkpoint (read-only)."""
    return checkpoints.get("mixtral")


@pytest.fixture(scope="session")
def mixtral_layout(mixtral_dir: Path) -> ExpertLayout:
    """The expert layout of ``mixtral_dir``."""
    return open_checkpoint(mixtral_dir)


@pytest.fixture(scope="session")
def shared_model_dir() -> Path:
    """The trained tiny Mixtral in ``../shared/models`` (skips when the shared directory is absent)."""
    if not (SHARED_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"trained model not found at {SHARED_MODEL_DIR} (clone shared/ beside the repository)")
    return SHARED_MODEL_DIR
