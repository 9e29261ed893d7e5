from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.encoders import EncoderConfig, create_encoder, select_device
from retrieval.encoders.base import default_dtype
from retrieval.errors import ConfigError, ModelUnavailable
from retrieval.registry import default_encoder, find_encoder, list_captioners, list_encoders, list_llms


def test_registry_is_data_with_the_required_models() -> None:
    ids = {s.hub_id for s in list_encoders()}
    assert {
        "openai/clip-vit-base-patch32",
        "openai/clip-vit-base-patch16",
        "openai/clip-vit-large-patch14",
    } <= ids
    assert any(s.family == "siglip" for s in list_encoders())
    assert default_encoder().hub_id == "openai/clip-vit-base-patch32"
    assert find_encoder("clip-vit-b-32") == find_encoder("openai/clip-vit-base-patch32")
    assert find_encoder("/some/dir") is None
    assert any(c.default for c in list_captioners()) and any(m.backend == "offline" for m in list_llms())


def test_outputs_are_normalised_float32(encoder) -> None:  # type: ignore[no-untyped-def]
    ims = [Image.new("RGB", (80, 50), c) for c in ("red", "blue", "green")]
    v = encoder.encode_images(ims, batch_size=2)
    t = encoder.encode_texts(["a red square", "a blue circle"])
    for arr, n in ((v, 3), (t, 2)):
        assert arr.dtype == np.float32 and arr.shape == (n, encoder.info.dim)
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, encoder.info.dim)


def test_long_text_is_truncated_not_an_error(encoder) -> None:  # type: ignore[no-untyped-def]
    long = "a red circle in the top left " * 200
    v = encoder.encode_texts([long, "a red circle in the top left"])
    assert v.shape == (2, encoder.info.dim)
    # truncation keeps the start: the long text's embedding equals that of its first context window
    ids = encoder.tokenizer(long, truncation=True, max_length=encoder.info.context_length)["input_ids"]
    assert len(ids) == encoder.info.context_length


def test_fast_preprocessing_matches_the_processor(encoder) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    ims = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((120, 90), (50, 200), (64, 64), (30, 20))
    ]
    ref = encoder.processor.image_processor(images=ims, return_tensors="np")["pixel_values"]
    mine = encoder.preprocess(ims)
    assert mine.shape == ref.shape
    # bicubic resampling differs by at most a grey level or two between the two code paths
    assert np.abs(mine - ref).max() < 0.1


def test_image_encoding_is_batch_invariant(encoder) -> None:  # type: ignore[no-untyped-def]
    ims = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green", "yellow")]
    together = encoder.encode_images(ims, batch_size=4)
    alone = np.concatenate([encoder.encode_images([im]) for im in ims])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_missing_hub_model_says_how_to_get_it() -> None:
    with pytest.raises(ModelUnavailable) as exc:
        create_encoder(EncoderConfig(model="clip-vit-b-32", device="cpu", precision="fp32"))
    msg = str(exc.value)
    assert "openai/clip-vit-base-patch32" in msg and "download" in msg and "clearsight demo" in msg


def test_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        create_encoder(EncoderConfig(model=str(tmp_path / "nope"), device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="could not load"):
        create_encoder(EncoderConfig(model=str(tmp_path / "empty"), device="cpu"))


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_device_selection(monkeypatch: pytest.MonkeyPatch, cuda: bool, native_bf16: bool) -> None:
    """`auto` is decided for a faked machine (CUDA present or not, CPU with or without native bf16),
    never for the one running the test, so the suite means the same on every CPU."""
    import torch

    from retrieval.encoders import base as encoder_base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(encoder_base, "cpu_has_native_bf16", lambda: native_bf16)
    assert select_device("cpu") == "cpu"
    assert select_device(None) == ("cuda" if cuda else "cpu")
    with pytest.raises(ConfigError):
        select_device("tpu")
    if cuda:
        assert select_device("cuda:1") == "cuda:1"
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")
    assert default_dtype("cuda") == "fp16"
    assert default_dtype("cpu") == ("bf16" if native_bf16 else "fp32")
    assert default_dtype(select_device(None)) == ("fp16" if cuda else "bf16" if native_bf16 else "fp32")
    assert default_dtype("cuda", "fp32") == "fp32" and default_dtype("cpu", "fp32") == "fp32"
    with pytest.raises(ConfigError):
        default_dtype("cpu", "fp8")


def test_siglip_family_loads_through_the_same_factory(tmp_path: Path) -> None:
    """A tiny SigLIP saved with save_pretrained loads and encodes (max-length padding, no text mask)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    from retrieval.demo.tiny import ARCHS, save_tokenizer_and_processor

    # SigLIP ships a SentencePiece tokenizer; a CLIP BPE tokenizer stands in (the model only sees ids).
    vocab = save_tokenizer_and_processor(tmp_path, ARCHS["tiny"])
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
    )
    SiglipModel(cfg).save_pretrained(str(tmp_path))
    enc = create_encoder(EncoderConfig(model=str(tmp_path), device="cpu", precision="fp32"))
    assert enc.info.family == "siglip"
    v = enc.encode_images([Image.new("RGB", (50, 40), "red")])
    t = enc.encode_texts(["a red square " * 50])
    assert v.shape == t.shape == (1, enc.info.dim)
    ref = enc.processor.image_processor(images=[Image.new("RGB", (50, 40), "red")], return_tensors="np")
    assert np.abs(enc.preprocess([Image.new("RGB", (50, 40), "red")]) - ref["pixel_values"]).max() < 0.1


def test_low_peak_load_gives_the_same_weights_as_from_pretrained(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """`load_model` reads a single safetensors file a tensor at a time (a lower memory peak); the model
    it makes holds exactly what `from_pretrained` loads, in the dtype asked; other layouts take that path."""
    import shutil

    import torch
    from transformers import AutoModel

    from retrieval.encoders.hf import _single_weights_file, load_model

    assert _single_weights_file(str(tiny_clip_dir), None) is not None
    ref = AutoModel.from_pretrained(str(tiny_clip_dir), dtype=torch.float32).state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        got = load_model(str(tiny_clip_dir), dtype=dtype).state_dict()
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert got[k].dtype == (dtype if v.is_floating_point() else v.dtype), k
            assert torch.equal(got[k], v.to(got[k].dtype)), k
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_clip_dir, sharded)
    (sharded / "model.safetensors.index.json").write_text("{}")  # a sharded layout: not this path
    assert _single_weights_file(str(sharded), None) is None
    assert _single_weights_file(str(tmp_path / "nowhere"), None) is None
