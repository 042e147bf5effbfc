"""Model interchange: bitwise round trips between the engine, reference, HF and timm layouts, and
feature equivalence against the real transformers / timm implementations (built locally, no hub)."""
import json
import os
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.cli import main as cli
from engine.tools.convert import infer_arch, read_checkpoint
from engine.tools.eval import extract_features, load_encoder
from engine.model import strip_module_prefix
from ijepa_tiny_ckpt import assert_same, make_engine_checkpoint

REFERENCE_KEYS = {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size",
                  "world_size", "lr"}


@pytest.fixture(scope="module")
def engine_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar")
    return path, make_engine_checkpoint(path)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_cli(*args):
    return cli(["convert", *map(str, args)])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one line on stderr, got {err}"
    assert err[0].startswith("ijepa: error: ")
    return err[0]


# ----------------------------------------------------------------------------- engine <-> reference
def test_engine_to_reference_to_engine_is_bitwise(engine_ckpt, tmp_path):
    path, original = engine_ckpt
    ref, back = tmp_path / "ref.pth.tar", tmp_path / "back.pth.tar"
    assert run_cli("--input", path, "--output", ref, "--to", "reference") == 0
    r = load(ref)
    assert set(r) == REFERENCE_KEYS, "a reference file holds exactly the reference's keys"
    assert all(k.startswith("module.") for name in ("encoder", "predictor", "target_encoder") for k in r[name])
    assert run_cli("--input", ref, "--output", back, "--to", "engine", "--num-heads", 3) == 0
    b = load(back)
    for key in REFERENCE_KEYS:
        assert_same(original[key], b[key], key)
    # the reference file carries no config: the architecture is re-derived from the shapes
    orig_cfg, new_cfg = original["engine"]["config"], b["engine"]["config"]
    assert new_cfg["model"]["embed_dim"] == 48 and new_cfg["model"]["depth"] == 2
    assert new_cfg["model"]["num_heads"] == 3
    assert new_cfg["data"]["crop_size"] == orig_cfg["data"]["crop_size"] == 32
    assert new_cfg["mask"]["patch_size"] == 4
    assert new_cfg["meta"]["pred_depth"] == 1 and new_cfg["meta"]["pred_emb_dim"] == 24
    assert b["engine"]["converted_from"] == "reference"


def test_reference_to_engine_to_reference_is_bitwise(engine_ckpt, tmp_path):
    path, original = engine_ckpt
    ref = {k: original[k] for k in REFERENCE_KEYS}
    torch.save(ref, tmp_path / "ref.pth.tar")
    assert run_cli("--input", tmp_path / "ref.pth.tar", "--output", tmp_path / "eng.pth.tar", "--to", "engine",
                   "--num-heads", 3) == 0
    assert run_cli("--input", tmp_path / "eng.pth.tar", "--output", tmp_path / "ref2.pth.tar",
                   "--to", "reference") == 0
    assert_same(ref, load(tmp_path / "ref2.pth.tar"), "reference")


def test_engine_to_engine_keeps_config_and_extra_keys(engine_ckpt, tmp_path):
    path, original = engine_ckpt
    with_extra = dict(original, sampler={"epoch": 3, "seed": 0})
    torch.save(with_extra, tmp_path / "in.pth.tar")
    assert run_cli("--input", tmp_path / "in.pth.tar", "--output", tmp_path / "out.pth.tar", "--to", "engine") == 0
    assert_same(with_extra, load(tmp_path / "out.pth.tar"), "engine")


def test_reference_file_without_module_prefix_loads(engine_ckpt, tmp_path):
    _, original = engine_ckpt
    bare = {k: (strip_module_prefix(v) if k in ("encoder", "predictor", "target_encoder") else v)
            for k, v in original.items() if k in REFERENCE_KEYS}
    torch.save(bare, tmp_path / "bare.pth.tar")
    assert run_cli("--input", tmp_path / "bare.pth.tar", "--output", tmp_path / "ref.pth.tar",
                   "--to", "reference", "--num-heads", 3) == 0
    for name in ("encoder", "predictor", "target_encoder"):
        assert_same(original[name], load(tmp_path / "ref.pth.tar")[name], name)


def test_factory_width_gives_heads_without_flag():
    # width 192 is ViT-tiny: 3 heads, as the reference factory; 1280 (ViT-H) has 16
    for width, heads in ((192, 3), (1280, 16)):
        sd = {"patch_embed.proj.weight": torch.zeros(width, 3, 14, 14), "pos_embed": torch.zeros(1, 256, width),
              "norm.weight": torch.zeros(width), "blocks.0.mlp.fc1.weight": torch.zeros(4 * width, width),
              "blocks.0.attn.qkv.weight": torch.zeros(3 * width, width), "blocks.0.attn.qkv.bias": torch.zeros(3 * width)}
        arch = infer_arch(sd)
        assert (arch.num_heads, arch.img_size, arch.patch_size, arch.depth) == (heads, 224, 14, 1)


def test_giant_mlp_width_survives_float_ratio():
    sd = {"patch_embed.proj.weight": torch.zeros(1408, 3, 16, 16), "pos_embed": torch.zeros(1, 196, 1408),
          "norm.weight": torch.zeros(1408), "blocks.0.mlp.fc1.weight": torch.zeros(6144, 1408),
          "blocks.0.attn.qkv.weight": torch.zeros(3 * 1408, 1408), "blocks.0.attn.qkv.bias": torch.zeros(3 * 1408)}
    arch = infer_arch(sd)
    assert int(arch.embed_dim * arch.mlp_ratio) == 6144


# ----------------------------------------------------------------------------- HuggingFace
@pytest.mark.parametrize("which,entry", [("context", "encoder"), ("target", "target_encoder")])
def test_engine_to_hf_to_engine_is_bitwise(engine_ckpt, tmp_path, which, entry):
    path, original = engine_ckpt
    assert run_cli("--input", path, "--output", tmp_path / "hf", "--to", "hf", "--encoder", which) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert run_cli("--input", tmp_path / "hf", "--output", tmp_path / "back.pth.tar", "--to", "engine") == 0
    back = load(tmp_path / "back.pth.tar")
    assert_same(original[entry], back["encoder"], "encoder")
    assert_same(original[entry], back["target_encoder"], "target_encoder")
    assert "predictor" not in back and back["engine"]["encoder_only"] is True


def test_hf_names_and_qkv_split(engine_ckpt, tmp_path):
    path, original = engine_ckpt
    run_cli("--input", path, "--output", tmp_path / "hf", "--to", "hf")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    qkv = original["encoder"]["module.blocks.1.attn.qkv.weight"]
    for i, name in enumerate(("query", "key", "value")):
        assert torch.equal(hf[f"encoder.layer.1.attention.attention.{name}.weight"], qkv[48 * i:48 * (i + 1)])
    assert torch.equal(hf["embeddings.position_embeddings"], original["encoder"]["module.pos_embed"])
    assert torch.equal(hf["layernorm.weight"], original["encoder"]["module.norm.weight"])
    assert torch.equal(hf["encoder.layer.0.intermediate.dense.weight"], original["encoder"]["module.blocks.0.mlp.fc1.weight"])
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"],
            cfg["image_size"], cfg["patch_size"], cfg["layer_norm_eps"], cfg["hidden_act"]) == \
        (48, 2, 3, 192, 32, 4, 1e-6, "gelu")


def _tiny_hf_config():
    from transformers import IJepaConfig
    return IJepaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                       image_size=32, patch_size=4, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu",
                       qkv_bias=True)


def test_converted_weights_give_the_same_features_in_transformers(engine_ckpt, tmp_path, images):
    from transformers import IJepaModel
    path, _ = engine_ckpt
    run_cli("--input", path, "--output", tmp_path / "hf", "--to", "hf", "--encoder", "target")
    model, info = IJepaModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    encoder = load_encoder(path, "target")
    with torch.no_grad():
        hidden = model(pixel_values=images).last_hidden_state   # after the final layernorm
    ours = encoder(images)
    torch.testing.assert_close(hidden, ours, atol=1e-5, rtol=0)
    # the probe's feature = HF's classification pooling (mean over patches of the normed tokens)
    torch.testing.assert_close(hidden.mean(1), extract_features(encoder, images), atol=1e-5, rtol=0)


def test_transformers_model_converts_to_the_same_encoder(tmp_path, images):
    from transformers import IJepaModel
    torch.manual_seed(0)
    model = IJepaModel(_tiny_hf_config()).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    encoder = load_encoder(str(tmp_path / "hf"))   # HF directory read directly
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).last_hidden_state, encoder(images), atol=1e-5, rtol=0)
    # and through an engine file, then back to HF: the safetensors tensors come back bit for bit
    assert run_cli("--input", tmp_path / "hf", "--output", tmp_path / "e.pth.tar", "--to", "engine") == 0
    assert run_cli("--input", tmp_path / "e.pth.tar", "--output", tmp_path / "hf2", "--to", "hf") == 0
    assert_same(load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors"))


def test_transformers_in_memory_names_are_read(tmp_path, images):
    # transformers >= 5 names modules layers.{i}.attention.q_proj ...; a raw state_dict() has those
    from transformers import IJepaModel
    torch.manual_seed(1)
    model = IJepaModel(_tiny_hf_config()).eval()
    (tmp_path / "raw").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "raw" / "model.safetensors")
    model.config.to_json_file(str(tmp_path / "raw" / "config.json"))
    encoder = load_encoder(str(tmp_path / "raw"))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).last_hidden_state, encoder(images), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- timm
def _tiny_timm_model():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
                             qkv_bias=True, class_token=False, global_pool="avg", fc_norm=False, pre_norm=False,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), dynamic_img_size=False,
                             num_classes=0)


@pytest.mark.parametrize("which,entry", [("context", "encoder"), ("target", "target_encoder")])
def test_engine_to_timm_to_engine_is_bitwise(engine_ckpt, tmp_path, which, entry):
    path, original = engine_ckpt
    out = tmp_path / "tiny.safetensors"
    assert run_cli("--input", path, "--output", out, "--to", "timm", "--encoder", which) == 0
    assert run_cli("--input", out, "--output", tmp_path / "back.pth.tar", "--to", "engine") == 0
    back = load(tmp_path / "back.pth.tar")
    assert_same(original[entry], back["encoder"], "encoder")


def test_converted_weights_give_the_same_features_in_timm(engine_ckpt, tmp_path, images):
    path, _ = engine_ckpt
    out = tmp_path / "tiny.safetensors"
    run_cli("--input", path, "--output", out, "--to", "timm", "--encoder", "target")
    model = _tiny_timm_model().eval()
    model.load_state_dict(load_file(out), strict=True)
    encoder = load_encoder(path, "target")
    with torch.no_grad():
        tokens = model.forward_features(images)   # includes timm's final per-token norm
        pooled = model(images)                    # num_classes=0: mean of those tokens, no fc_norm
    torch.testing.assert_close(tokens, encoder(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, extract_features(encoder, images), atol=1e-5, rtol=0)


def test_timm_model_converts_with_explicit_heads(tmp_path, images, capsys):
    torch.manual_seed(0)
    model = _tiny_timm_model().eval()
    plain = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, plain)   # no metadata
    # width 48 is no factory size and a bare timm file records no head count
    assert run_cli("--input", plain, "--output", tmp_path / "e.pth.tar", "--to", "engine") == 2
    assert "--num-heads" in error_line(capsys)
    assert run_cli("--input", plain, "--output", tmp_path / "e.pth.tar", "--to", "engine", "--num-heads", 3) == 0
    encoder = load_encoder(str(tmp_path / "e.pth.tar"))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), encoder(images), atol=1e-5, rtol=0)
    assert run_cli("--input", tmp_path / "e.pth.tar", "--output", tmp_path / "t2.safetensors", "--to", "timm") == 0
    assert_same(load_file(plain), load_file(tmp_path / "t2.safetensors"))


def test_old_timm_fc_norm_name_is_read_as_per_token_norm(engine_ckpt, tmp_path, images):
    path, original = engine_ckpt
    sd = strip_module_prefix(original["encoder"])
    sd = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in sd.items()}
    torch.save(sd, tmp_path / "old_timm.pth")
    enc = load_encoder(str(tmp_path / "old_timm.pth"), num_heads=3)
    torch.testing.assert_close(enc(images), load_encoder(path, "context")(images), atol=0, rtol=0)


# ----------------------------------------------------------------------------- bad input
def test_missing_input_file(tmp_path, capsys):
    assert run_cli("--input", tmp_path / "nope.pth.tar", "--output", tmp_path / "o", "--to", "hf") == 2
    assert "no such file" in error_line(capsys)


def test_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "x.pth.tar").write_bytes(os.urandom(2000))
    assert run_cli("--input", tmp_path / "x.pth.tar", "--output", tmp_path / "o", "--to", "hf") == 2
    assert "not a readable checkpoint" in error_line(capsys)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "y.pth.tar")
    assert run_cli("--input", tmp_path / "y.pth.tar", "--output", tmp_path / "o", "--to", "hf") == 2
    assert "not an I-JEPA checkpoint" in error_line(capsys)


def test_unknown_target_format(engine_ckpt, tmp_path, capsys):
    assert run_cli("--input", engine_ckpt[0], "--output", tmp_path / "o", "--to", "onnx") == 2
    assert "--to 'onnx'" in error_line(capsys)


def test_existing_output_needs_force(engine_ckpt, tmp_path, capsys):
    (tmp_path / "o.pth.tar").write_bytes(b"keep me")
    assert run_cli("--input", engine_ckpt[0], "--output", tmp_path / "o.pth.tar", "--to", "reference") == 2
    assert "--force" in error_line(capsys)
    assert (tmp_path / "o.pth.tar").read_bytes() == b"keep me"


def test_encoder_only_source_cannot_become_a_reference_checkpoint(engine_ckpt, tmp_path, capsys):
    run_cli("--input", engine_ckpt[0], "--output", tmp_path / "t.safetensors", "--to", "timm")
    assert run_cli("--input", tmp_path / "t.safetensors", "--output", tmp_path / "r.pth.tar", "--to", "reference") == 2
    assert "only an encoder" in error_line(capsys)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):   # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_executing_pickle_is_refused(engine_ckpt, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = dict(load(engine_ckpt[0]))
    evil["scaler"] = _RunsCode(str(marker))
    torch.save(evil, tmp_path / "evil.pth.tar")
    assert run_cli("--input", tmp_path / "evil.pth.tar", "--output", tmp_path / "o.pth.tar", "--to", "engine") == 2
    line = error_line(capsys)
    assert "refused" in line and "io.open" in line
    assert not marker.exists(), "loading must not run code from the file"
    assert cli(["eval", "--checkpoint", str(tmp_path / "evil.pth.tar")]) == 2
    assert "refused" in error_line(capsys)
    assert not marker.exists()
    with pytest.raises(Exception, match="refused"):
        read_checkpoint(str(tmp_path / "evil.pth.tar"))
