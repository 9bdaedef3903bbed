"""Image prompts for MoE vision-language models: one image and a prompt's tokens -> the model's inputs.

The image processor is the family's own (its PIL variant, which needs no torchvision), configured from the
checkpoint's ``preprocessor_config.json`` when there is one and otherwise from its ``vision_config``; nothing
is downloaded. The image becomes as many image tokens as the processor's merged patches. Where they go:
a prompt that holds the image token once (a chat template written out) has it expanded in place; otherwise
the image, between the family's start and end markers, comes before the prompt's text, as the families'
chat templates place a user's image. The vision tower is a non-expert part; the language model's experts are
offloaded as ever.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertflow.errors import ConfigError


@dataclass(frozen=True)
class VisionFamily:
    processor: str  # transformers' image processor class (PIL variant)
    start_key: str  # config key of the token before the image's tokens
    end_key: str  # config key of the token after them
    temporal: bool = True  # the processor takes the vision config's temporal_patch_size
    # ERNIE-4.5-VL routes image tokens and their markers to its vision experts by a second type mask.
    expert_types: bool = False


#: MoE-VLM families whose image prompts are built here (tested with images: tests/test_vlm_images.py).
VISION_FAMILIES: dict[str, VisionFamily] = {
    "qwen3_vl_moe": VisionFamily("Qwen2VLImageProcessorPil", "vision_start_token_id", "vision_end_token_id"),
    "glm4v_moe": VisionFamily("Glm4vImageProcessorPil", "image_start_token_id", "image_end_token_id"),
    "ernie4_5_vl_moe": VisionFamily(
        "Ernie4_5_VLMoeImageProcessorPil",
        "image_start_token_id",
        "image_end_token_id",
        temporal=False,
        expert_types=True,
    ),
}


def _read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return config


def takes_images(model_dir: str | Path) -> bool:
    """Whether the checkpoint is a vision-language model (it has a vision tower)."""
    return "vision_config" in _read_config(model_dir)


def load_image(path: str | Path) -> Any:
    """An RGB PIL image from ``path``; a missing or unreadable file is a :class:`ConfigError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ConfigError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable image ({exc})") from None


class ImagePrompts:
    """Builds image + text inputs for one checkpoint; :class:`ConfigError` at construction when it cannot
    take images (a text-only model, or a MoE-VLM family not in :data:`VISION_FAMILIES`)."""

    def __init__(self, model_dir: str | Path) -> None:
        import transformers

        config = _read_config(model_dir)
        if "vision_config" not in config:
            raise ConfigError(f"{model_dir} is a text-only model: it takes no image")
        family = VISION_FAMILIES.get(str(config.get("model_type")))
        if family is None:
            raise ConfigError(
                f"image prompts for model type {config.get('model_type')!r} are not built here; supported: "
                f"{', '.join(sorted(VISION_FAMILIES))}"
            )
        vision = config["vision_config"]
        self.merge = int(vision.get("spatial_merge_size", 2))
        kwargs: dict[str, Any] = {"patch_size": vision["patch_size"], "merge_size": self.merge}
        if family.temporal:
            kwargs["temporal_patch_size"] = vision.get("temporal_patch_size", 2)
        self.expert_types = family.expert_types
        saved = Path(model_dir) / "preprocessor_config.json"
        if saved.is_file():
            try:
                stored = json.loads(saved.read_text())
            except ValueError as exc:
                raise ConfigError(f"{saved} is not JSON: {exc}") from exc
            # The class names a fast (torchvision) variant; its settings are the same.
            stored.pop("image_processor_type", None)
            stored.pop("processor_class", None)
            kwargs.update(stored)
            self.merge = int(kwargs["merge_size"])
        self.processor = getattr(transformers, family.processor)(**kwargs)
        text = config.get("text_config", config)
        self.image_token = int(config.get("image_token_id", text.get("image_token_id", -1)))
        self.start = int(config.get(family.start_key, text.get(family.start_key, -1)))
        self.end = int(config.get(family.end_key, text.get(family.end_key, -1)))
        vocab = int(text.get("vocab_size", 0))
        for name, token in (("image", self.image_token), ("start", self.start), ("end", self.end)):
            if not 0 <= token < vocab:
                raise ConfigError(f"{model_dir}: the image {name} token id {token} is not in the vocabulary")

    def inputs(self, prompt_ids: Sequence[int], image: str | Path) -> dict[str, torch.Tensor]:
        """``input_ids`` with the image's tokens, ``pixel_values``, ``image_grid_thw`` and the token types
        (``mm_token_type_ids``: 1 on image tokens) the model's 3-D rotary positions need; for ERNIE-4.5-VL,
        also ``moe_mm_token_type_ids`` (image tokens and their markers), which sends them to vision experts."""
        pixels = self.processor(images=[load_image(image)], return_tensors="pt")
        count = int(pixels["image_grid_thw"].prod()) // self.merge**2
        ids = list(prompt_ids)
        places = [i for i, t in enumerate(ids) if t == self.image_token]
        if len(places) > 1:
            raise ConfigError(f"the prompt holds the image token {len(places)} times: one image per prompt")
        if places:
            at = places[0]
            ids = ids[:at] + [self.image_token] * count + ids[at + 1 :]
        else:
            ids = [self.start] + [self.image_token] * count + [self.end] + ids
        input_ids = torch.tensor([ids], dtype=torch.long)
        image_tokens = input_ids == self.image_token
        inputs = {
            "input_ids": input_ids,
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": image_tokens.long(),
        }
        if self.expert_types:
            inputs["moe_mm_token_type_ids"] = (
                image_tokens | (input_ids == self.start) | (input_ids == self.end)
            ).long()
        return inputs
