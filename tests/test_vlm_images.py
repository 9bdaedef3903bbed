"""MoE vision-language models with an image in the prompt: ExpertFlow's logits and greedy tokens equal
transformers' in-memory model's, experts evicted and read again, from the library, `generate --image`, a
requests file and the eval grid. Images are generated here; the image processor is built from the fixture's
vision config (nothing is downloaded). The reference inputs are built by hand in this file, apart from
expertflow.model.vision, which builds them for the CLI, the batch and the grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from expertflow.cli import main
from expertflow.config import StoreConfig
from expertflow.errors import ConfigError
from expertflow.lab.grid import bench_grid, parse_grid, read_tasks, run_configuration
from expertflow.model.batch import generate_many, read_requests
from expertflow.model.loader import load_model
from expertflow.model.vision import ImagePrompts
from tests.family_fixtures import model_class_name, save_tiny_checkpoint

#: MoE-VLM families checked with images, and the image processor each family's processor uses.
FAMILIES = {
    "qwen3_vl_moe": "Qwen2VLImageProcessorPil",
    "glm4v_moe": "Glm4vImageProcessorPil",
    "ernie4_5_vl_moe": "Ernie4_5_VLMoeImageProcessorPil",
}


def _image(path: Path, seed: int = 0, size: int = 112) -> Path:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def _inputs(root: Path, family: str) -> dict[str, torch.Tensor]:
    """A prompt with one generated image, tokenised as the family's processor does: the image's merged patches
    as image tokens between the start and end markers, and the token types M-RoPE needs."""
    config = json.loads((root / "config.json").read_text())
    vision = config["vision_config"]
    merge = vision["spatial_merge_size"]
    temporal = (
        {} if family == "ernie4_5_vl_moe" else {"temporal_patch_size": vision.get("temporal_patch_size", 2)}
    )
    processor = getattr(transformers, FAMILIES[family])(
        patch_size=vision["patch_size"], merge_size=merge, **temporal
    )
    pixels = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype("uint8")
    image = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    count = int(image["image_grid_thw"].prod()) // merge**2
    start = config.get("image_start_token_id", config.get("vision_start_token_id"))
    end = config.get("image_end_token_id", config.get("vision_end_token_id"))
    ids = torch.tensor([[1, 2, start] + [config["image_token_id"]] * count + [end, 5, 6, 7]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": image["pixel_values"],
        "image_grid_thw": image["image_grid_thw"],
        "mm_token_type_ids": (ids == config["image_token_id"]).long(),
    }
    if family == "ernie4_5_vl_moe":  # its processor's second mask: image tokens and markers to vision experts
        inputs["moe_mm_token_type_ids"] = (
            (ids == config["image_token_id"]) | (ids == start) | (ids == end)
        ).long()
    return inputs


def _checkpoint(family: str, root: Path) -> Path:
    save_tiny_checkpoint(family, root)
    config = json.loads((root / "config.json").read_text())
    if config.get("image_token_id", 1 << 30) >= config.get("text_config", config).get("vocab_size", 0):
        # The generic fixture keeps the family's real special-token ids; move them into its tiny vocabulary.
        config.update(
            image_token_id=250, video_token_id=249, vision_start_token_id=251, vision_end_token_id=252
        )
        (root / "config.json").write_text(json.dumps(config))
    return root


def _reference(root: Path, family: str) -> transformers.PreTrainedModel:
    class_name, _ = model_class_name(family)
    return getattr(transformers, class_name).from_pretrained(root, dtype=torch.float32).eval()


def _greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint("qwen3_vl_moe", tmp_path_factory.mktemp("vlm") / "qwen3_vl_moe")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_image_prompt_gives_the_logits_of_the_in_memory_model(family: str, tmp_path: Path) -> None:
    root = _checkpoint(family, tmp_path / family)
    inputs = _inputs(root, family)
    reference = _reference(root, family)
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_prompts_are_built_as_the_family_processor_builds_them(family: str, tmp_path: Path) -> None:
    """The library's builder gives the hand-built inputs: a prompt holding the image token has it expanded in
    place; a prompt without one gets the image, between its markers, before the text."""
    root = _checkpoint(family, tmp_path / family)
    want = _inputs(root, family)
    config = json.loads((root / "config.json").read_text())
    start = config.get("image_start_token_id", config.get("vision_start_token_id"))
    end = config.get("image_end_token_id", config.get("vision_end_token_id"))
    image = _image(tmp_path / "image.png")
    got = ImagePrompts(root).inputs([1, 2, start, config["image_token_id"], end, 5, 6, 7], image)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    before = ImagePrompts(root).inputs([1, 2], image)["input_ids"][0].tolist()
    count = int(want["mm_token_type_ids"].sum())
    assert before == [start] + [config["image_token_id"]] * count + [end, 1, 2]
    with pytest.raises(ConfigError, match="one image per prompt"):
        ImagePrompts(root).inputs([config["image_token_id"]] * 2, image)


def test_generate_with_an_image_prints_the_in_memory_models_tokens(
    qwen3_vl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _image(tmp_path / "cat.png", seed=3)
    args = ["generate", str(qwen3_vl), "--image", str(image), "--token-ids", "7,8,9", "--max-new-tokens", "6"]
    assert main([*args, "--host-mem", "100KiB", "--json", "--ignore-eos"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]  # --json: stdout is the JSON document alone
    want = _greedy(_reference(qwen3_vl, "qwen3_vl_moe"), ImagePrompts(qwen3_vl).inputs([7, 8, 9], image), 6)
    assert got == want and len(got) == 6


def test_an_image_for_a_text_only_model_or_a_bad_image_is_refused_before_loading(
    qwen3_vl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_only = save_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    image = _image(tmp_path / "x.png")
    assert main(["generate", str(text_only), "--image", str(image), "--token-ids", "1,2"]) == 2
    assert "text-only model: it takes no image" in capsys.readouterr().err
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    assert main(["generate", str(qwen3_vl), "--image", str(not_an_image), "--token-ids", "1,2"]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    assert main(["generate", str(qwen3_vl), "--image", str(tmp_path / "gone.png"), "--token-ids", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_requests_file_mixes_image_and_text_requests_each_as_if_run_alone(
    qwen3_vl: Path, tmp_path: Path
) -> None:
    """Text requests run in the continuous batch, image requests one at a time; every output is the in-memory
    model's for the request alone, experts evicted and read again."""
    for seed in (1, 2):
        _image(tmp_path / f"img{seed}.png", seed=seed, size=56 * seed)
    lines = [
        {"id": "t1", "token_ids": [3, 4, 5], "max_new_tokens": 4},
        {"id": "i1", "token_ids": [10, 11], "image": "img1.png", "max_new_tokens": 5},
        {"id": "t2", "token_ids": [9, 8, 7, 6, 5], "max_new_tokens": 3},
        {"id": "i2", "token_ids": [12], "image": str(tmp_path / "img2.png"), "max_new_tokens": 3},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    requests = read_requests(path, qwen3_vl, max_new_tokens=2)
    assert [r.image is not None for r in requests] == [False, True, False, True]
    with load_model(qwen3_vl, config=StoreConfig(host_bytes=100 << 10)) as model:
        result = generate_many(model, requests, schedule="experts", max_requests=2)
        assert model.expert_stats().evictions > 0
    reference = _reference(qwen3_vl, "qwen3_vl_moe")
    prompts = ImagePrompts(qwen3_vl)
    for r in requests:
        if r.image is None:
            inputs = {"input_ids": torch.tensor([list(r.input_ids)])}
        else:
            inputs = prompts.inputs(r.input_ids, r.image)
        assert result.outputs[r.id] == _greedy(reference, inputs, r.max_new_tokens), r.id
    # The text requests ran in the batch, then the image requests one at a time.
    assert set(result.order[:2]) == {"t1", "t2"} and set(result.order[2:]) == {"i1", "i2"}


def test_the_grid_runs_image_yes_no_tasks_and_lossless_configurations_agree(
    qwen3_vl: Path, tmp_path: Path
) -> None:
    """POPE-style yes/no questions about generated images; two lossless configurations answer alike."""
    for seed in range(3):
        _image(tmp_path / f"scene{seed}.png", seed=seed)
    tasks = [
        {"kind": "yesno", "prompt": f"Is there a cat? {i}", "image": f"scene{i % 3}.png", "answer": a}
        for i, a in enumerate(["yes", "no", "yes", "no"])
    ]
    tasks.append({"kind": "exact", "prompt": "1+1=", "answer": "2"})
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    assert sum(t.image is not None for t in read_tasks(path, qwen3_vl, byte_tokens=True)) == 4
    rows = bench_grid(
        str(qwen3_vl),
        str(path),
        parse_grid(["budget=0.3,1", "schedule=fifo,experts"]),
        tmp_path / "out",
        byte_tokens=True,
        workdir=tmp_path / "work",
        progress=False,
        run=run_configuration,
    )
    assert len(rows) == 4 and not any("error" in r for r in rows)
    assert len({r["answers_digest"] for r in rows}) == 1
    assert all({"yesno_accuracy", "yesno_f1", "yes_ratio", "exact_match"} <= set(r) for r in rows)
    assert all(len(r["answers"]) == 5 for r in rows)


def test_a_ppl_task_with_an_image_is_refused(qwen3_vl: Path, tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"kind": "ppl", "text": "abc", "image": "a.png"}) + "\n")
    with pytest.raises(ConfigError, match="line 1: a ppl task is a text; it takes no image"):
        read_tasks(path, qwen3_vl, byte_tokens=True)


def test_prompt_tokens_equal_to_the_pad_id_are_kept_with_an_image(
    qwen3_vl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Token 0 is the pad id generate() uses: without an explicit attention mask it would mask those prompt
    tokens out and answer another prompt."""
    image = _image(tmp_path / "x.png", seed=5)
    prompt = [0, 5, 0, 7, 0]
    args = [
        "generate",
        str(qwen3_vl),
        "--image",
        str(image),
        "--token-ids",
        "0,5,0,7,0",
        "--max-new-tokens",
        "5",
    ]
    assert main([*args, "--host-mem", "100KiB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    inputs = ImagePrompts(qwen3_vl).inputs(prompt, image)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])  # the reference attends to every token
    assert got == _greedy(_reference(qwen3_vl, "qwen3_vl_moe"), inputs, 5)


def test_saved_processor_settings_are_used(qwen3_vl: Path, tmp_path: Path) -> None:
    """A checkpoint's saved image processor settings (transformers 5's processor_config.json, or the older
    preprocessor_config.json) decide how many tokens an image becomes."""
    root = tmp_path / "ckpt"
    root.mkdir()
    for f in qwen3_vl.iterdir():
        (root / f.name).symlink_to(f)
    image = _image(tmp_path / "x.png", size=112)
    default = int(ImagePrompts(root).inputs([1], image)["mm_token_type_ids"].sum())
    settings = {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "max_pixels": 56 * 56,
        "min_pixels": 28 * 28,
    }
    (root / "processor_config.json").write_text(json.dumps({"image_processor": settings}))
    smaller = int(ImagePrompts(root).inputs([1], image)["mm_token_type_ids"].sum())
    assert 0 < smaller < default
    (root / "processor_config.json").unlink()
    (root / "preprocessor_config.json").write_text(json.dumps(settings))
    assert int(ImagePrompts(root).inputs([1], image)["mm_token_type_ids"].sum()) == smaller
    (root / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        ImagePrompts(root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["vision_config"].pop("patch_size"), "cannot build its image processor"),
        (lambda c: c.update(image_token_id=None), "image token id"),
        (lambda c: c.update(vision_start_token_id=10**6), "image start token id"),
    ],
)
def test_a_malformed_vision_config_is_a_config_error(qwen3_vl: Path, tmp_path: Path, change, message) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    for f in qwen3_vl.iterdir():
        if f.name != "config.json":
            (root / f.name).symlink_to(f)
    config = json.loads((qwen3_vl / "config.json").read_text())
    change(config)
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        ImagePrompts(root)


def test_an_image_the_processor_refuses_is_named_before_any_work(qwen3_vl: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 4000, 3), dtype="uint8")).save(tmp_path / "strip.png")
    path = tmp_path / "requests.jsonl"
    path.write_text(
        json.dumps({"token_ids": [1, 2]}) + "\n" + json.dumps({"token_ids": [3], "image": "strip.png"}) + "\n"
    )
    with pytest.raises(ConfigError, match=r"line 2: .*strip\.png: the image processor refuses it"):
        read_requests(path, qwen3_vl, max_new_tokens=2)


def test_a_prompt_holding_the_image_token_without_an_image_is_refused(qwen3_vl: Path, tmp_path: Path) -> None:
    token = json.loads((qwen3_vl / "config.json").read_text())["image_token_id"]
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps({"token_ids": [1, 2]}) + "\n" + json.dumps({"token_ids": [3, token]}) + "\n")
    with pytest.raises(ConfigError, match=rf"line 2: the prompt holds the image token \({token}\)"):
        read_requests(path, qwen3_vl, max_new_tokens=2)
