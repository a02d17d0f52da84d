"""Our model against transformers' ASTForAudioClassification: same checkpoint files, same inputs, logits within 1e-5."""

from __future__ import annotations

import pytest
import torch

from ast_cli.checkpoint.model import AST, ASTConfig
from ast_cli.checkpoint.weights import build_model, load_checkpoint, remap_original
from conftest import make_reference
from tolerances import MODEL_VS_TRANSFORMERS

TOLERANCE = MODEL_VS_TRANSFORMERS  # see tests/tolerances.py

CONFIGS = {
    "tiny": {},
    # Full-size (768-d, 12 layers) checkpoints in the three published input shapes.
    "full-10-10": {},
    "full-16-16": dict(frequency_stride=16, time_stride=16),
    "full-128": dict(max_length=128),
}


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=[pytest.mark.slow] if name.startswith("full") else []) for name in CONFIGS])
def reference(request, tmp_path_factory):
    name = request.param
    return name, *make_reference(tmp_path_factory.mktemp(name), name, **CONFIGS[name])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_transformers(reference, attn):
    name, directory, hf_model, _ = reference
    checkpoint = load_checkpoint(directory)
    model = build_model(checkpoint, attn=attn)
    torch.manual_seed(1)
    batch = 2 if name == "tiny" else 1  # batching is checked on the tiny model; full size costs seconds a clip
    inputs = torch.randn(batch, checkpoint.config.max_length, checkpoint.config.num_mel_bins)
    with torch.inference_mode():
        expected = hf_model(inputs).logits
        got = model(inputs)
    assert got.shape == expected.shape == (batch, 527)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_embedding_matches_pooler_output(reference):
    _, directory, hf_model, _ = reference
    model = build_model(load_checkpoint(directory))
    inputs = torch.randn(1, model.config.max_length, model.config.num_mel_bins)
    with torch.inference_mode():
        expected = hf_model.audio_spectrogram_transformer(inputs).pooler_output
        got = model.forward_features(inputs)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_config_shapes_match_reference(reference):
    name, directory, hf_model, _ = reference
    config = load_checkpoint(directory).config
    f_dim, t_dim = hf_model.audio_spectrogram_transformer.embeddings.get_shape(hf_model.config)
    assert config.patch_grid == (f_dim, t_dim)
    if name == "full-10-10":
        assert config.num_tokens == 1214 and config.patch_grid == (12, 101)
        assert sum(p.numel() for p in build_model(load_checkpoint(directory)).parameters()) == 86_594_063


def _original_state_dict(hf_state: dict) -> dict:
    """Hub-named weights written in the original YuanGongND/ast naming (DataParallel, fused qkv)."""
    out = {}
    for key, value in hf_state.items():
        k = key.replace("audio_spectrogram_transformer.", "")
        k = (k.replace("embeddings.cls_token", "v.cls_token")
             .replace("embeddings.distillation_token", "v.dist_token")
             .replace("embeddings.position_embeddings", "v.pos_embed")
             .replace("embeddings.patch_embeddings.projection", "v.patch_embed.proj")
             .replace("classifier.layernorm", "mlp_head.0")
             .replace("classifier.dense", "mlp_head.1"))
        if k.startswith("layernorm."):
            k = "v.norm." + k.split(".", 1)[1]
        if k.startswith("encoder.layer."):
            _, _, i, rest = k.split(".", 3)
            if rest.startswith("attention.attention."):
                continue  # fused below
            rest = (rest.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
                    .replace("attention.output.dense", "attn.proj").replace("intermediate.dense", "mlp.fc1")
                    .replace("output.dense", "mlp.fc2"))
            k = f"v.blocks.{i}.{rest}"
        out["module." + k] = value
    layers = {k.split(".")[3] for k in hf_state if k.startswith("audio_spectrogram_transformer.encoder.layer.")}
    for i in layers:
        base = f"audio_spectrogram_transformer.encoder.layer.{i}.attention.attention."
        for param in ("weight", "bias"):
            fused = torch.cat([hf_state[f"{base}{part}.{param}"] for part in ("query", "key", "value")])
            out[f"module.v.blocks.{i}.attn.qkv.{param}"] = fused
    # The DeiT ImageNet heads the original checkpoints carry and never use.
    out["module.v.head.weight"] = torch.zeros(1000, 32)
    out["module.v.head_dist.bias"] = torch.zeros(1000)
    return out


def test_original_checkpoint_remap(tiny_checkpoint, tmp_path):
    directory, hf_model, _ = tiny_checkpoint
    hub_state = load_checkpoint(directory).state_dict  # the key names of the hub files
    original = _original_state_dict(hub_state)
    assert any(".attn.qkv." in k for k in original)
    remapped = remap_original(original)
    assert set(remapped) == set(hub_state)
    # Through a .pth file next to the checkpoint's config, as a user would pass it.
    pth = tmp_path / "audioset_10_10_0.4593.pth"
    torch.save(original, pth)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model = build_model(load_checkpoint(pth))
    inputs = torch.randn(2, 64, 128)
    with torch.inference_mode():
        torch.testing.assert_close(model(inputs), hf_model(inputs).logits, atol=TOLERANCE, rtol=0)


def test_original_full_size_checkpoint_without_config(reference, tmp_path):
    """A bare original .pth (no config.json): shape and labels are inferred from the tensors."""
    name, directory, hf_model, _ = reference
    if not name.startswith("full"):
        pytest.skip("inference needs the published 768-d shapes")
    pth = tmp_path / "model.pth"
    torch.save(_original_state_dict(load_checkpoint(directory).state_dict), pth)
    checkpoint = load_checkpoint(pth)
    assert checkpoint.config.id2label[0] == "Speech" and checkpoint.config.num_labels == 527
    assert (checkpoint.config.max_length, checkpoint.config.time_stride) == (
        hf_model.config.max_length, hf_model.config.time_stride)
    model = build_model(checkpoint)
    inputs = torch.randn(1, checkpoint.config.max_length, 128)
    with torch.inference_mode():
        torch.testing.assert_close(model(inputs), hf_model(inputs).logits, atol=TOLERANCE, rtol=0)


def test_encoder_only_config_has_no_head():
    model = AST(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          max_length=32))
    assert model.classifier is None
    assert model.forward_features(torch.zeros(1, 32, 128)).shape == (1, 32)
    with pytest.raises(ValueError, match="no classification head"):
        model(torch.zeros(1, 32, 128))


def test_wrong_input_shape_is_refused(tiny_checkpoint):
    model = build_model(load_checkpoint(tiny_checkpoint[0]))
    with pytest.raises(ValueError, match=r"expected input \(B, 64, 128\)"):
        model(torch.zeros(1, 100, 128))


def test_26_13_in_place_steps_without_autograd_change_no_bit():
    """Without autograd the blocks add the residuals and apply GELU in place (no fresh 15 MB tensor per step):
    the same scores bit for bit as the autograd path (x + y is y + x), with the last block's two queries too."""
    import torch

    from ast_cli.checkpoint.model import AST, ASTConfig

    torch.manual_seed(0)
    config = ASTConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
                       max_length=64, num_mel_bins=128, frequency_stride=10, time_stride=10, id2label=("a", "b"))
    for act in ("gelu", "gelu_new", "relu"):
        model = AST(ASTConfig(**{**config.__dict__, "hidden_act": act})).eval()
        x = torch.randn(2, 64, 128)
        with torch.inference_mode():
            fast, features = model(x), model.forward_features(x)
        assert torch.equal(fast, model(x).detach()) and torch.equal(features, model.forward_features(x).detach())


def test_s8_an_astmodel_save_pretrained_encoder_loads_and_pools_as_transformers(tmp_path):
    """s8, outside the area: an encoder saved by transformers' ``ASTModel.save_pretrained`` (keys without the
    ``audio_spectrogram_transformer.`` prefix) was refused as "does not fit the AST architecture"."""
    from transformers import ASTConfig as HFConfig, ASTModel

    from conftest import TINY

    torch.manual_seed(2)
    encoder = ASTModel(HFConfig(**TINY)).eval()
    encoder.save_pretrained(tmp_path / "encoder")
    inputs = torch.randn(2, TINY["max_length"], TINY["num_mel_bins"])
    with torch.inference_mode():
        expected = encoder(inputs).pooler_output
    for path in (tmp_path / "encoder", tmp_path / "encoder" / "model.safetensors"):  # the folder, the weights file
        checkpoint = load_checkpoint(path)
        model = build_model(checkpoint)
        assert model.classifier is None and checkpoint.config.id2label == ()
        with torch.inference_mode():
            torch.testing.assert_close(model.forward_features(inputs), expected, atol=TOLERANCE, rtol=0)
