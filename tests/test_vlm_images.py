"""MoE vision-language models with an image in the prompt: ExpertFlow's logits equal transformers' in-memory
model's, experts evicted and read again. Images are generated here; the image processor is built from the
fixture's vision config (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from expertflow.config import StoreConfig
from expertflow.model.loader import load_model
from tests.family_fixtures import model_class_name, save_tiny_checkpoint

#: MoE-VLM families checked with images, and the image processor each family's processor uses.
FAMILIES = {
    "qwen3_vl_moe": "Qwen2VLImageProcessorPil",
    "glm4v_moe": "Glm4vImageProcessorPil",
}


def _inputs(root: Path, family: str) -> dict[str, torch.Tensor]:
    """A prompt with one generated image, tokenised as the family's processor does: the image's merged patches
    as image tokens between the start and end markers, and the token types M-RoPE needs."""
    config = json.loads((root / "config.json").read_text())
    vision = config["vision_config"]
    merge = vision["spatial_merge_size"]
    processor = getattr(transformers, FAMILIES[family])(
        patch_size=vision["patch_size"],
        merge_size=merge,
        temporal_patch_size=vision.get("temporal_patch_size", 2),
    )
    pixels = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype("uint8")
    image = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    count = int(image["image_grid_thw"].prod()) // merge**2
    start = config.get("image_start_token_id", config.get("vision_start_token_id"))
    end = config.get("image_end_token_id", config.get("vision_end_token_id"))
    ids = torch.tensor([[1, 2, start] + [config["image_token_id"]] * count + [end, 5, 6, 7]])
    return {
        "input_ids": ids,
        "pixel_values": image["pixel_values"],
        "image_grid_thw": image["image_grid_thw"],
        "mm_token_type_ids": (ids == config["image_token_id"]).long(),
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_image_prompt_gives_the_logits_of_the_in_memory_model(family: str, tmp_path: Path) -> None:
    root = save_tiny_checkpoint(family, tmp_path / family)
    config = json.loads((root / "config.json").read_text())
    if config.get("image_token_id", 1 << 30) >= config.get("text_config", config).get("vocab_size", 0):
        # The generic fixture keeps the family's real special-token ids; move them into its tiny vocabulary.
        config.update(
            image_token_id=250, video_token_id=249, vision_start_token_id=251, vision_end_token_id=252
        )
        (root / "config.json").write_text(json.dumps(config))
    inputs = _inputs(root, family)
    class_name, _ = model_class_name(family)
    reference = getattr(transformers, class_name).from_pretrained(root, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(**inputs).logits
    del reference
    with (
        load_model(root, config=StoreConfig(host_bytes=100 << 10, predictor="combined")) as model,
        torch.no_grad(),
    ):
        got = model(**inputs).logits
        stats = model.expert_stats()
    assert inputs["mm_token_type_ids"].sum() >= 4  # the image is really in the prompt
    assert stats.evictions > 0
    assert (got - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0)
