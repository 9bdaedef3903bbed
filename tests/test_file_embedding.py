"""The input embedding read by row from the checkpoint file (issue #23, memory for experts): the same logits
as the table held whole, its bytes left to the expert pool, and a file that changes underneath refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from expertflow.config import StoreConfig
from expertflow.errors import CheckpointError
from expertflow.model.file_embedding import FileEmbedding
from expertflow.model.loader import load_model, plan_model
from tests.checkpoints import save_checkpoint

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_rows_read_from_the_file_give_the_logits_of_the_table_held_whole(tmp_path: Path, family: str) -> None:
    src = save_checkpoint(family, tmp_path / "src", shard_size=None)
    with torch.no_grad():
        with load_model(src, config=StoreConfig(embedding_from_file=False, predictor="none")) as whole:
            assert not isinstance(whole.get_input_embeddings(), FileEmbedding)
            want = whole(input_ids=IDS).logits
        with load_model(src, config=StoreConfig(predictor="none")) as by_row:
            assert isinstance(by_row.get_input_embeddings(), FileEmbedding)
            got = by_row(input_ids=IDS).logits
    assert torch.equal(got, want)


def test_the_table_is_not_reserved_beside_the_expert_pool(tmp_path: Path) -> None:
    src = save_checkpoint("mixtral", tmp_path / "src", shard_size=None)
    whole = plan_model(src, StoreConfig(embedding_from_file=False)).reserve_bytes
    by_row = plan_model(src, StoreConfig()).reserve_bytes
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(src).get_text_config()
    assert whole - by_row == text.vocab_size * text.hidden_size * 4  # fp32 fixture


def test_a_checkpoint_file_truncated_under_the_model_is_an_error_not_a_crash(tmp_path: Path) -> None:
    src = save_checkpoint("mixtral", tmp_path / "src", shard_size=None)
    with load_model(src, config=StoreConfig(predictor="none")) as model:
        embedding = model.get_input_embeddings()
        assert isinstance(embedding, FileEmbedding)
        with torch.no_grad():
            model(input_ids=IDS)
        # The mapped pages of the table are gone: reading one would kill the process with SIGBUS.
        os.truncate(embedding.file, 8)
        with pytest.raises(CheckpointError, match="changed since it was opened"), torch.no_grad():
            model(input_ids=torch.tensor([[250, 251, 252]]))
