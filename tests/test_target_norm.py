"""loss.target_norm: how targets are normalised before the smooth-L1 loss."""
import pytest
import torch

from engine.config import ConfigError, IJEPAConfig
from engine.model import build_model, normalise_over_batch


def _h(b=6, n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g)


def test_layer_mode_is_the_reference_identity():
    h = _h()
    assert normalise_over_batch(h, "layer") is h


@pytest.mark.parametrize("mode", ["center", "batch"])
def test_position_only_component_is_removed(mode):
    # a term that depends on the token position only (what a small grid's sin-cos embedding
    # contributes) must not reach the targets
    h = _h()
    pos = _h(b=1, seed=1) * 10
    torch.testing.assert_close(normalise_over_batch(h + pos, mode), normalise_over_batch(h, mode),
                               atol=1e-4, rtol=1e-4)


def test_center_has_zero_batch_mean_and_batch_has_unit_variance():
    h = _h() * 3 + 1
    c = normalise_over_batch(h, "center")
    assert c.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(c, h - h.mean(0, keepdim=True))
    b = normalise_over_batch(h, "batch")
    torch.testing.assert_close(b.pow(2).mean(0), torch.ones(5, 8), atol=1e-4, rtol=1e-4)


def test_keeps_dtype():
    h = _h().bfloat16()
    assert normalise_over_batch(h, "batch").dtype == torch.bfloat16


def _tiny(mode):
    return IJEPAConfig.from_dict({
        "meta": {"model_name": "vit_tiny", "pred_depth": 1, "pred_emb_dim": 16, "use_bfloat16": False},
        "model": {"depth": 1, "embed_dim": 24, "num_heads": 2},
        "data": {"crop_size": 32, "dataset": "synthetic"},
        "mask": {"patch_size": 4, "min_keep": 2},
        "loss": {"target_norm": mode}})


def test_model_targets_use_the_mode():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    masks_enc = [torch.tensor([[0, 1, 2, 3]] * 4)]
    masks_pred = [torch.tensor([[5, 6, 9]] * 4)]
    ref = build_model(_tiny("layer"))
    cen = build_model(_tiny("center"))
    cen.load_state_dict(ref.state_dict())
    h_ref = ref.targets(images, masks_enc, masks_pred)
    h_cen = cen.targets(images, masks_enc, masks_pred)
    assert not torch.allclose(h_ref, h_cen)
    # same images everywhere: nothing is left after centring (LayerNorm of zeros is zero)
    same = images[:1].expand(4, -1, -1, -1)
    assert cen.targets(same, masks_enc, masks_pred).abs().max() < 1e-3
    assert ref.targets(same, masks_enc, masks_pred).abs().max() > 0.5
    loss = cen(images, masks_enc, masks_pred)
    loss.backward()
    assert torch.isfinite(loss) and cen.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.target_norm"):
        _tiny("whiten")
