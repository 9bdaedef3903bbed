"""``expertflow eval ppl``: perplexity, and KL / top-1 agreement against a reference, measured on real models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from expertflow.cli import main
from expertflow.errors import ConfigError
from expertflow.lab.accuracy import evaluate, token_ids
from expertflow.model.quantize_pack import pack_quantized
from expertflow.quant.scheme import QuantScheme
from tests.checkpoints import save_checkpoint

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("accuracy")
    src = save_checkpoint("mixtral", root / "src")
    return src, pack_quantized(src, root / "int4", QuantScheme(4, 32), progress=False)


def test_a_model_against_itself_has_zero_kl_and_full_agreement(models: tuple[Path, Path]) -> None:
    src, _ = models
    model = transformers.MixtralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = token_ids(src, TEXT)
    result = evaluate(model, ids, name="m", reference=model, reference_name="m", window=64)
    assert result.tokens == len(ids) - math.ceil(len(ids) / 64)  # each window predicts all but its first
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.top1_agreement == 1.0
    assert result.reference_nll == pytest.approx(result.nll)
    # A random model is close to uniform over its 256 byte values.
    assert 0.5 * math.log(256) < result.nll < 2 * math.log(256)


def test_the_cli_measures_a_quantized_pack_against_its_source(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, pack = models
    text = tmp_path / "held_out.py"
    text.write_text(TEXT)
    args = ["eval", "ppl", str(src), str(pack), "--text", str(text), "--reference", str(src)]
    assert main([*args, "--window", "64", "--out", str(tmp_path / "out"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    lossless, quantized = results
    assert lossless["kl"] == pytest.approx(0.0, abs=1e-6) and lossless["top1_agreement"] == 1.0
    assert quantized["kl"] > 1e-6 and quantized["perplexity"] != lossless["perplexity"]
    written = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert written["results"] == results and "eval ppl" in written["command"]
    assert str(pack) in (tmp_path / "out" / "accuracy.md").read_text()


def test_text_is_fed_as_bytes_only_to_a_byte_level_model(tmp_path: Path) -> None:
    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1
    )
    config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no tokenizer and a vocabulary of 100"):
        token_ids(tmp_path, "abc")


def test_incremental_evaluation_equals_one_forward_and_measures_cache_aware_routing(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = models
    model = transformers.MixtralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = token_ids(src, TEXT)[:40]
    whole = evaluate(model, ids, name="m", window=20)
    stepwise = evaluate(model, ids, name="m", window=20, incremental=True)
    assert stepwise.tokens == whole.tokens and stepwise.nll == pytest.approx(whole.nll, rel=1e-5)
    text = tmp_path / "held_out.py"
    text.write_text(TEXT[:200])
    args = ["eval", "ppl", str(src), "--text", str(text), "--reference", str(src), "--window", "32", "--json"]
    assert main([*args, "--incremental", "--host-mem", "600KiB", "--routing-margin", "1.0"]) == 0
    (lossy,) = json.loads(capsys.readouterr().out)
    assert lossy["rerouted_share"] > 0 and lossy["kl"] > 0 and lossy["top1_agreement"] < 1
