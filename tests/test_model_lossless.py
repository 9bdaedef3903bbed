"""The core promise: a model whose experts stream through a small ExpertStore computes what transformers computes.

For every family the reference is the unmodified transformers model loaded fully in memory from the same
directory (fp32). The offloaded model gets a host budget of 2 * top_k experts, so experts are evicted and read
again many times, and most MoE calls are computed in several waves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from expertflow.config import StoreConfig
from expertflow.errors import StoreClosedError
from expertflow.model.loader import load_model
from expertflow.pipeline.planner import slot_size
from expertflow.pipeline.sync import ExpertStore
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint
from tests.checkpoints import FAMILIES

PROMPT_LEN = 12
NEW_TOKENS = 32


def _reference(root: Path) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(root)
    cls = getattr(transformers, (config.architectures or [""])[0], None) or AutoModelForCausalLM
    return cls.from_pretrained(root, dtype=torch.float32).eval()


def _top_k(root: Path) -> int:
    return int(AutoConfig.from_pretrained(root).get_text_config().num_experts_per_tok)


def _small_budget(layout: ExpertLayout, experts: int) -> StoreConfig:
    slot = slot_size(layout, StoreConfig().read_mode)
    return StoreConfig(host_bytes=experts * slot, predictor="none")


def _prompt(vocab: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=g)


def _resident_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_model_matches_transformers_logits_and_greedy_tokens(family: str, checkpoints) -> None:
    root = Path(checkpoints.get(family))
    layout = open_checkpoint(root)
    top_k = _top_k(root)
    reference = _reference(root)
    vocab = reference.config.get_text_config().vocab_size

    with load_model(root, config=_small_budget(layout, 2 * top_k)) as model:
        assert model.expert_store.num_slots == 2 * top_k < len(layout.experts)
        # No expert weight is held by the model: what it owns is the non-expert part of the checkpoint.
        assert _resident_bytes(model) <= layout.non_expert_bytes + 4096
        assert all(not list(m.parameters()) for m in model.expert_layers.values())

        prompt = _prompt(vocab, batch=2, seed=7)
        with torch.no_grad():
            expected = reference(prompt).logits
            actual = model(prompt).logits
        diff = (actual - expected).abs().max().item()
        scale = expected.abs().max().item()
        assert diff <= 1e-5 * max(scale, 1.0), f"{family}: max |diff| {diff:.3g} at logit scale {scale:.3g}"

        one = prompt[:1]
        with torch.no_grad():
            want = reference.generate(
                one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            got = model.generate(one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert want.shape[1] == PROMPT_LEN + NEW_TOKENS
        assert torch.equal(got, want), f"{family}: greedy tokens differ"

        stats = model.expert_stats()
        # Experts were evicted and read again, and non-resident experts were computed in later waves.
        assert stats.device_misses > len(layout.experts)
        assert stats.evictions > 0
        layers = model.expert_layers.values()
        assert sum(m.waves for m in layers) > sum(m.calls for m in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_whose_experts_all_fit_decodes_on_their_slots_without_pins_and_exactly(
    family: str, checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for every expert: once read, an expert keeps its slot, and forward passes compute on the slots they
    know (no pin, no release: a prompt's pass and every decode step), with the same tokens as transformers."""
    root = Path(checkpoints.get(family))
    layout = open_checkpoint(root)
    reference = _reference(root)
    one = _prompt(reference.config.get_text_config().vocab_size, batch=1, seed=5)
    with load_model(root, config=_small_budget(layout, len(layout.experts))) as model:
        store = model.expert_store
        with torch.no_grad():
            want = reference.generate(
                one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            first = model.generate(one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            pinned: list[set] = []
            real = store.fetch_as_ready

            def fetch_as_ready(keys):
                pinned.append(set(keys))
                return real(keys)

            monkeypatch.setattr(store, "fetch_as_ready", fetch_as_ready)
            used: list[int] = []  # experts each MoE call uses (a pin would count each once)
            for m in model.expert_layers.values():
                m.route_hooks.append(
                    lambda layer, hidden, index, weights: used.append(len(set(index.view(-1).tolist())))
                )
            hits = store.stats().device_hits
            again = model.generate(one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(first, want) and torch.equal(again, want), f"{family}: greedy tokens differ"
        assert pinned == []  # every expert the run uses was read by the first one
        assert len(used) == NEW_TOKENS * len(model.expert_layers)  # the prompt's pass and 31 decode steps
        assert store.stats().device_hits - hits == sum(used)
        assert store.stats().device_misses == len(store.resident()) and store.pinned() == []


def test_closing_the_model_closes_the_store_it_created(checkpoints) -> None:
    root = Path(checkpoints.get(FAMILIES[0]))
    model = load_model(root)
    prompt = _prompt(model.config.get_text_config().vocab_size, batch=1, seed=1)
    model.close()
    model.close()  # idempotent
    with pytest.raises(StoreClosedError), torch.no_grad():
        model(prompt)


def test_a_shared_store_outlives_the_model_and_serves_a_second_one(checkpoints) -> None:
    root = Path(checkpoints.get(FAMILIES[0]))
    layout = open_checkpoint(root)
    # Room for every expert: what the first model read stays resident for the second.
    with ExpertStore(layout, _small_budget(layout, len(layout.experts))) as store:
        first = load_model(root, store=store)
        prompt = _prompt(first.config.get_text_config().vocab_size, batch=1, seed=3)
        with torch.no_grad():
            expected = first(prompt).logits
        first.close()  # the caller owns this store: it stays open
        misses = store.stats().device_misses
        second = load_model(root, store=store)
        with torch.no_grad():
            actual = second(prompt).logits
        # The first run computed in waves as experts landed, the second in one wave each: round-off only.
        assert (actual - expected).abs().max().item() <= 1e-5 * max(expected.abs().max().item(), 1.0)
        assert store.stats().device_misses == misses


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_separate_device_slots_are_lossless(family: str, checkpoints) -> None:
    """The two-level path CUDA uses (host pool + its own device slot arena), run on the CPU."""
    root = Path(checkpoints.get(family))
    layout = open_checkpoint(root)
    top_k = _top_k(root)
    reference = _reference(root)
    config = _small_budget(layout, 3 * top_k).with_(device_slots=2 * top_k)
    with ExpertStore(layout, config, separate_device=True) as store:
        model = load_model(root, store=store)
        prompt = _prompt(reference.config.get_text_config().vocab_size, batch=2, seed=11)
        with torch.no_grad():
            expected = reference(prompt).logits
            actual = model(prompt).logits
        assert (actual - expected).abs().max().item() <= 1e-5 * max(expected.abs().max().item(), 1.0)
        assert store.stats().bytes_uploaded > 0


def test_trained_model_generates_the_same_text_offloaded(shared_model_dir: Path) -> None:
    """A trained tiny Mixtral (bytes of Python source): real routing, not random weights."""
    layout = open_checkpoint(shared_model_dir)
    reference = _reference(shared_model_dir)
    prompt = torch.tensor([list(b"def main():\n    ")])
    with load_model(shared_model_dir, config=_small_budget(layout, 2 * _top_k(shared_model_dir))) as model:
        with torch.no_grad():
            want = reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(got, want)
        assert model.expert_stats().device_misses > len(layout.experts)


def test_an_init_weights_that_reaches_into_the_experts_never_touches_the_offloaded_module(
    checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some families' ``_init_weights`` initialise the experts through their parent block (qwen3_omni_moe:
    ``init.normal_(module.experts.gate_up_proj)`` for each sparse MoE block). Initialisation runs while the
    family's own experts module (meta, never allocated) is in place, so it cannot reach the offloaded module,
    whose tensors are slot views."""
    from transformers import initialization as init
    from transformers.models.mixtral import modeling_mixtral as mm

    original = mm.MixtralPreTrainedModel._init_weights
    reached: list[str] = []

    def init_like_qwen3_omni(self, module):  # type: ignore[no-untyped-def]
        original(self, module)
        if isinstance(module, mm.MixtralSparseMoeBlock):
            reached.append(type(module.experts).__name__)
            init.normal_(module.experts.gate_up_proj, mean=0.0, std=0.02)
            init.normal_(module.experts.down_proj, mean=0.0, std=0.02)

    root = checkpoints.get("mixtral")
    want = _reference(root)
    monkeypatch.setattr(mm.MixtralPreTrainedModel, "_init_weights", init_like_qwen3_omni)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    config = _small_budget(open_checkpoint(root), 2 * _top_k(root))
    with load_model(root, config=config) as model, torch.no_grad():
        got = model(ids).logits
    assert reached and set(reached) == {"MixtralExperts"}  # it ran, on the family's module
    with torch.no_grad():
        ref = want(ids).logits
    assert (got - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1.0)
