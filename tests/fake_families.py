"""Fabricated MoE families, registered with transformers' Auto classes like any third-party family, whose
experts modules subclass Mixtral's decorated ``MixtralExperts`` and override ``forward``.

* ``expertflow_test_idscaled``: scales each route's weight by its expert id. Meaningful only for the family's
  own expert ids, so ExpertFlow, which hands the module slot ids, cannot run it exactly: it must be refused.
* ``expertflow_test_normed``: one output row per route, then a per-expert scale (a ``[num_experts, hidden]``
  table in a submodule, as Ergo's per-expert norm), then the weighted sum. ExpertFlow hands the module the
  rows of the experts in its slots, so this one runs exactly.

Neither depends on a family shipping in a given transformers release.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralForCausalLM

from expertflow.model.tiny import randomise


class IdScaledConfig(MixtralConfig):
    model_type = "expertflow_test_idscaled"


class IdScaledExperts(MixtralExperts):
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        scale = 1.0 + top_k_index.to(top_k_weights.dtype) / self.num_experts
        return super().forward(hidden_states, top_k_index, top_k_weights * scale)


class NormedConfig(MixtralConfig):
    model_type = "expertflow_test_normed"


class ExpertScale(nn.Module):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.num_local_experts, config.hidden_size))


class NormedExperts(MixtralExperts):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        self.expert_scale = ExpertScale(config)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        k = top_k_index.shape[1]
        rows = hidden_states.repeat_interleave(k, dim=0)  # [tokens * k, H]: one row per route
        flat = top_k_index.reshape(-1, 1)
        out = super().forward(rows, flat, rows.new_ones(flat.shape))
        out = out * self.expert_scale.weight[flat.flatten().clamp_max(self.num_experts - 1)]
        return (out.view(*top_k_index.shape, -1) * top_k_weights.unsqueeze(-1)).sum(1)


def _with_experts(experts_cls: type[MixtralExperts], config_cls: type[MixtralConfig]) -> type:
    class Model(MixtralForCausalLM):
        config_class = config_cls

        def __init__(self, config: MixtralConfig) -> None:
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp.experts = experts_cls(config)

    Model.__name__ = Model.__qualname__ = f"{experts_cls.__name__.removesuffix('Experts')}ForCausalLM"
    return Model


IdScaledForCausalLM = _with_experts(IdScaledExperts, IdScaledConfig)
NormedForCausalLM = _with_experts(NormedExperts, NormedConfig)

for _config, _model in ((IdScaledConfig, IdScaledForCausalLM), (NormedConfig, NormedForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)


def save_fake_checkpoint(config_cls: type[MixtralConfig], path: Path, seed: int = 0) -> Path:
    """A tiny seeded model of the fabricated family ``config_cls``, saved with ``save_pretrained``."""
    model_cls = IdScaledForCausalLM if config_cls is IdScaledConfig else NormedForCausalLM
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    config.architectures = [model_cls.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    return Path(path)


def reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own logits for ``ids`` from the checkpoint at ``path``."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits
