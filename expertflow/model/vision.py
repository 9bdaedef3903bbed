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


def _config_value(config: dict[str, Any], key: str) -> Any:
    """A MoE-VLM's setting: at the top of its config, or in its text config."""
    text = config.get("text_config")
    return config.get(key, text.get(key) if isinstance(text, dict) else None)


def image_token_id(model_dir: str | Path) -> int | None:
    """The token that stands for an image's patches in a MoE-VLM's prompts; None for a text-only model."""
    config = _read_config(model_dir)
    if not isinstance(config.get("vision_config"), dict):
        return None
    token = _config_value(config, "image_token_id")
    return token if isinstance(token, int) else None


def load_image(path: str | Path) -> Any:
    """An RGB PIL image from ``path``; a missing or unreadable file is a :class:`ConfigError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ConfigError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"{path} is not a readable image ({exc})") from None


def _saved_processor_settings(root: Path) -> dict[str, Any]:
    """The image processor's settings saved with the checkpoint: ``processor_config.json``'s
    ``image_processor`` (transformers 5) or ``preprocessor_config.json``; none when neither is there."""
    for name, section in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = root / name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if section is not None:
            saved = saved.get(section) if isinstance(saved, dict) else None
            if saved is None:
                continue
        if not isinstance(saved, dict):
            raise ConfigError(f"{path}: the image processor's settings are not a JSON object")
        # The class named there may be a fast (torchvision) variant; its settings are the same.
        return {k: v for k, v in saved.items() if k not in ("image_processor_type", "processor_class")}
    return {}


class ImagePrompts:
    """Builds image + text inputs for one checkpoint; :class:`ConfigError` at construction when it cannot
    take images (a text-only model, or a MoE-VLM family not in :data:`VISION_FAMILIES`)."""

    def __init__(self, model_dir: str | Path) -> None:
        config = _read_config(model_dir)
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError(f"{model_dir} is a text-only model: it takes no image")
        family = VISION_FAMILIES.get(str(config.get("model_type")))
        if family is None:
            raise ConfigError(
                f"image prompts for model type {config.get('model_type')!r} are not built here; supported: "
                f"{', '.join(sorted(VISION_FAMILIES))}"
            )
        try:
            self._build(Path(model_dir), config, vision, family)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{model_dir}: cannot build its image processor from its config ({exc!r})"
            ) from None

    def _build(
        self, root: Path, config: dict[str, Any], vision: dict[str, Any], family: VisionFamily
    ) -> None:
        import transformers

        kwargs: dict[str, Any] = {
            "patch_size": vision["patch_size"],
            "merge_size": vision.get("spatial_merge_size", 2),
        }
        if family.temporal:
            kwargs["temporal_patch_size"] = vision.get("temporal_patch_size", 2)
        kwargs.update(_saved_processor_settings(root))
        self.merge = int(kwargs["merge_size"])
        self.expert_types = family.expert_types
        self.processor = getattr(transformers, family.processor)(**kwargs)
        text = config.get("text_config") or {}
        vocab = int(text.get("vocab_size", config.get("vocab_size", 0)))
        ids = {}
        for name, key in (
            ("image", "image_token_id"),
            ("image start", family.start_key),
            ("image end", family.end_key),
        ):
            token = _config_value(config, key)
            if not isinstance(token, int) or not 0 <= token < vocab:
                raise ConfigError(
                    f"{root}: the {name} token id ({key} = {token!r}) is not in the vocabulary of {vocab}"
                )
            ids[name] = token
        self.image_token, self.start, self.end = ids["image"], ids["image start"], ids["image end"]

    def inputs(self, prompt_ids: Sequence[int], image: str | Path) -> dict[str, torch.Tensor]:
        """``input_ids`` with the image's tokens, ``pixel_values``, ``image_grid_thw`` and the token types
        (``mm_token_type_ids``: 1 on image tokens) the model's 3-D rotary positions need; for ERNIE-4.5-VL,
        also ``moe_mm_token_type_ids`` (image tokens and their markers), which sends them to vision experts."""
        try:
            pixels = self.processor(images=[load_image(image)], return_tensors="pt")
        except ValueError as exc:  # e.g. an aspect ratio the processor refuses
            raise ConfigError(f"{image}: the image processor refuses it ({exc})") from None
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
            # Explicit: without it, generate() would mask prompt tokens equal to the pad id.
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": image_tokens.long(),
        }
        if self.expert_types:
            inputs["moe_mm_token_type_ids"] = (
                image_tokens | (input_ids == self.start) | (input_ids == self.end)
            ).long()
        return inputs
