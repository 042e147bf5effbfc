"""Model structure and reference conventions (the numeric parity lives in test_parity.py)."""
import math

import pytest
import torch

from engine import IJEPA, IJEPAConfig
from engine.model import repeat_interleave_batch, sincos_pos_embed_2d, strip_module_prefix


def tiny_cfg(**kw):
    d = {"meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 24, "use_bfloat16": False},
         "model": {"embed_dim": 48, "depth": 3, "num_heads": 3},
         "data": {"dataset": "synthetic", "crop_size": 32},
         "mask": {"patch_size": 4, "min_keep": 4}}
    for k, v in kw.items():
        d.setdefault(k, {}).update(v)
    return IJEPAConfig.from_dict(d)


def test_pos_embed_layout_columns_first_then_rows():
    D, G = 16, 4
    t = sincos_pos_embed_2d(D, G)
    assert t.shape == (G * G, D)
    q = D // 4
    # token 1 is (row 0, col 1): column half carries sin(1)/cos(1), row half sin(0)/cos(0)
    assert t[1, 0].item() == pytest.approx(math.sin(1.0))
    assert t[1, q].item() == pytest.approx(math.cos(1.0))
    assert t[1, 2 * q].item() == 0.0 and t[1, 3 * q].item() == 1.0
    # token G is (row 1, col 0)
    assert t[G, 0].item() == 0.0 and t[G, 2 * q].item() == pytest.approx(math.sin(1.0))
    # frequencies: omega_k = 10000^(-k/q)
    assert t[1, 1].item() == pytest.approx(math.sin(10000 ** (-1 / q)))


def test_repeat_interleave_batch_order():
    B = 2
    x = torch.arange(6).view(6, 1)   # 3 chunks of B rows: [0,1] [2,3] [4,5]
    out = repeat_interleave_batch(x, B, repeat=2).flatten().tolist()
    assert out == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]


def test_effective_init_has_no_depth_rescale_and_target_is_a_copy():
    torch.manual_seed(0)
    m = IJEPA(tiny_cfg(model={"depth": 6, "embed_dim": 96}))
    last = m.encoder.blocks[-1].attn.proj.weight
    assert last.std().item() == pytest.approx(0.02, rel=0.1)   # the ctor's /sqrt(2*6) was undone
    for a, b in zip(m.encoder.state_dict().values(), m.target_encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in m.target_encoder.parameters())
    assert not m.encoder.pos_embed.requires_grad


def test_param_groups_match_reference_rules():
    m = IJEPA(tiny_cfg())
    groups = m.param_groups()
    assert len(groups) == 4
    assert [g.get("WD_exclude", False) for g in groups] == [False, False, True, True]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert id(m.predictor.mask_token) in ids[1]            # mask_token IS weight-decayed
    assert id(m.encoder.pos_embed) in ids[0]               # frozen, but in the decayed group
    assert id(m.encoder.patch_embed.proj.weight) in ids[0]
    assert id(m.encoder.blocks[0].norm1.weight) in ids[2]  # 1-D -> no decay
    assert id(m.encoder.blocks[0].attn.qkv.bias) in ids[2]
    n_all = sum(1 for _ in m.encoder.parameters()) + sum(1 for _ in m.predictor.parameters())
    assert sum(len(s) for s in ids) == n_all


def test_reference_state_dict_round_trip_with_and_without_prefix():
    torch.manual_seed(0)
    a = IJEPA(tiny_cfg())
    torch.manual_seed(1)
    b = IJEPA(tiny_cfg())
    sd = a.reference_state_dict()
    assert all(k.startswith("module.") for k in sd["encoder"])
    assert "module.blocks.0.attn.qkv.weight" in sd["encoder"]
    assert "module.predictor_blocks.0.mlp.fc2.bias" in sd["predictor"]
    b.load_reference_state_dict(sd)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    torch.manual_seed(2)
    c = IJEPA(tiny_cfg())
    c.load_reference_state_dict({k: strip_module_prefix(v) for k, v in sd.items()})
    assert torch.equal(c.encoder.norm.weight, a.encoder.norm.weight)
    with pytest.raises(KeyError):
        c.load_reference_state_dict({"encoder": sd["encoder"]})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_backward_shapes_and_backends_agree(precision):
    from engine.masks import MultiBlockMaskSampler
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = IJEPA(cfg)
    torch.manual_seed(3)
    s = MultiBlockMaskSampler.from_config(cfg)
    me, mp = s(3)
    x = torch.randn(3, 3, 32, 32)
    losses = {}
    for be in ("naive", "sdpa", "chunked"):
        m.set_backends(attention=be)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, z, h = m.forward_parts(x, me, mp)
        assert z.shape == h.shape == (len(mp) * 3, mp[0].shape[1], 48)
        losses[be] = loss.float().item()
    tol = 1e-6 if precision == "fp32" else 2e-2
    assert losses["naive"] == pytest.approx(losses["sdpa"], rel=tol)
    assert losses["naive"] == pytest.approx(losses["chunked"], rel=tol)


def test_update_target_moves_toward_encoder():
    torch.manual_seed(0)
    m = IJEPA(tiny_cfg())
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    before = m.target_encoder.norm.weight.clone()
    m.update_target(0.9)
    after = m.target_encoder.norm.weight
    assert torch.allclose(after, 0.9 * before + 0.1 * m.encoder.norm.weight, atol=1e-7)
