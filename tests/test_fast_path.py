"""Exactness of the fast training step: every speed switch on vs the reference-semantics path.

The reference-semantics path (naive attention, plain gather, no row skipping, per-tensor EMA)
is pinned to the reference itself by tests/test_parity.py; here the fast path must give the
same losses over 20 optimizer steps: fp32 within 1e-5 relative, bf16 within 1e-2.
"""
import pytest
import torch

from engine import IJEPAConfig
from engine.masks import MultiBlockMaskSampler
from engine.model import build_model
from engine.schedules import Schedules
from engine.strategy import LocalStrategy
from engine.train import train_step

SLOW = {"kernels": {"attention": "naive", "gather": "torch", "ema": "naive"},
        "train": {"skip_unused_rows": False}, "optimization": {"fused_optimizer": False}}
FAST = {"kernels": {"attention": "auto", "gather": "auto", "ema": "auto"},
        "train": {"skip_unused_rows": True}, "optimization": {"fused_optimizer": True}}


def cfg_with(extra, precision):
    d = {"meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 24},
         "model": {"embed_dim": 48, "depth": 2, "num_heads": 3},
         "data": {"dataset": "synthetic", "crop_size": 32, "batch_size": 4},
         "mask": {"patch_size": 4, "min_keep": 4},
         "optimization": {"epochs": 4, "warmup": 1},
         "train": {"precision": precision}}
    for sec, vals in extra.items():
        d.setdefault(sec, {}).update(vals)
    return IJEPAConfig.from_dict(d)


def run(cfg, steps=20):
    strategy = LocalStrategy(cfg)
    model = strategy.model
    sched = Schedules.from_config(cfg, ipe=5)
    torch.manual_seed(0)
    sampler = MultiBlockMaskSampler.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=g)
        me, mp = sampler(4)
        loss, _ = train_step(strategy, [(x, me, mp)], lr=sched.lr(step), wd=sched.wd(step),
                             momentum=sched.momentum(step))
        losses.append(float(loss))
    return losses, model


@pytest.mark.parametrize("precision,rel", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_fast_path_matches_reference_semantics_over_20_steps(precision, rel):
    slow, m_slow = run(cfg_with(SLOW, precision))
    fast, m_fast = run(cfg_with(FAST, precision))
    for a, b in zip(slow, fast):
        assert abs(a - b) <= rel * abs(a), (slow, fast)
    # the loss actually moved, so the comparison covers real updates
    assert slow[-1] < slow[0]
    if precision == "fp32":
        for (k, a), b in zip(m_slow.target_encoder.state_dict().items(), m_fast.target_encoder.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k


def test_skipping_unused_rows_changes_no_gradient():
    cfg_a, cfg_b = cfg_with(SLOW, "fp32"), cfg_with({"train": {"skip_unused_rows": True},
                                                     "kernels": {"attention": "naive"}}, "fp32")
    torch.manual_seed(0)
    s = MultiBlockMaskSampler.from_config(cfg_a)
    me, mp = s(3)
    x = torch.randn(3, 3, 32, 32)
    grads = []
    for cfg in (cfg_a, cfg_b):
        m = build_model(cfg)
        m(x, me, mp).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8), n


def test_activation_checkpointing_gives_identical_gradients():
    cfg_a = cfg_with({"kernels": {"attention": "naive"}}, "fp32")
    cfg_b = cfg_with({"kernels": {"attention": "naive"}, "train": {"activation_checkpointing": True}}, "fp32")
    torch.manual_seed(0)
    me, mp = MultiBlockMaskSampler.from_config(cfg_a)(2)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for cfg in (cfg_a, cfg_b):
        m = build_model(cfg)
        m(x, me, mp).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """Regional torch.compile (inductor on CPU): same loss and gradients as eager, and changing
    token counts reuse the dynamic graph."""
    cfg = cfg_with({"kernels": {"attention": "sdpa"}}, "fp32")
    torch.manual_seed(0)
    s = MultiBlockMaskSampler.from_config(cfg)
    batches = [(torch.randn(2, 3, 32, 32), *s(2)) for _ in range(2)]
    eager, compiled = build_model(cfg), build_model(cfg)
    compiled.compile_blocks()
    for x, me, mp in batches:
        la, lb = eager(x, me, mp), compiled(x, me, mp)
        la.backward()
        lb.backward()
        assert torch.allclose(la, lb, rtol=1e-5)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("kernel_set", [{"gather": "triton", "ema": "triton"},
                                        {"gather": "triton", "ema": "triton", "attention": "triton"}])
def test_training_step_with_triton_kernels_matches_torch_path(kernel_set):
    """The Triton kernels (under the interpreter on CPU) inside a real training step: same loss,
    gradients and EMA'd target as the PyTorch path (fp32, 1e-5)."""
    # head dim 32 in encoder and predictor: a size the Triton attention ships
    arch = {"model": {"embed_dim": 64, "depth": 2, "num_heads": 2, "pred_num_heads": 1},
            "meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 32}}
    base = {**arch, "kernels": {"attention": "sdpa", "gather": "torch", "ema": "torch"}}
    tri = {**arch, "kernels": {"attention": "sdpa", **kernel_set}}
    torch.manual_seed(0)
    s = MultiBlockMaskSampler.from_config(cfg_with(base, "fp32"))
    me, mp = s(2)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for extra in (base, tri):
        cfg = cfg_with(extra, "fp32")
        strategy = LocalStrategy(cfg)
        m = strategy.model
        loss, _ = train_step(strategy, [(x, me, mp)], lr=1e-3, wd=0.04, momentum=0.99)
        m2 = build_model(cfg)
        m2(x, me, mp).backward()
        results.append((float(loss), [p.grad for p in m2.parameters() if p.grad is not None],
                        [t.clone() for t in m.target_encoder.parameters()]))
    (la, ga, ta), (lb, gb, tb) = results
    assert abs(la - lb) <= 1e-5 * abs(la)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(ta, tb):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_packed_predictor_equals_padded_computation_on_the_same_masks():
    """Ragged masks of equal lengths: the packed path (no padding, varlen attention) gives the
    padded computation's loss and gradients; with whole (untruncated) masks it trains."""
    cfg = cfg_with({"mask": {"mode": "paper", "num_enc_masks": 2, "allow_overlap": True,
                             "enc_mask_scale": [0.4, 0.6]}, "kernels": {"attention": "sdpa"}}, "fp32")
    torch.manual_seed(0)
    me, mp = MultiBlockMaskSampler.from_config(cfg)(3)
    x = torch.randn(3, 3, 32, 32)
    rag_e = [[m[b] for m in me] for b in range(3)]
    rag_p = [[m[b] for m in mp] for b in range(3)]
    out = []
    for masks in ((me, mp), (rag_e, rag_p)):
        m = build_model(cfg)
        loss, z, h = m.forward_parts(x, *masks)
        loss.backward()
        out.append((loss, z.reshape(-1, z.shape[-1]), h.reshape(-1, h.shape[-1]),
                    [p.grad for p in m.parameters() if p.grad is not None]))
    (la, za, ha, ga), (lb, zb, hb, gb) = out
    assert abs(la.item() - lb.item()) <= 1e-6 * la.item()
    assert torch.allclose(za, zb, atol=1e-6) and torch.equal(ha, hb)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_packed_training_uses_whole_masks(tmp_path):
    from engine.train import train
    cfg = cfg_with({"mask": {"mode": "paper", "packed": True},
                    "logging": {"folder": str(tmp_path), "tensorboard": False},
                    "train": {"progress": False, "max_steps": 4}, "optimization": {"epochs": 2},
                    "data": {"synthetic_size": 64}}, "fp32")
    out = train(cfg)
    assert out["steps"] == 4 and all(l == l for l in out["losses"])
    import csv
    rows = list(csv.DictReader(open(out["csv"])))
    # mean whole-mask context length exceeds what batch-minimum truncation would keep
    truncated = cfg_with({"mask": {"mode": "paper"}}, "fp32")
    torch.manual_seed(0)
    me, _ = MultiBlockMaskSampler.from_config(truncated)(4)
    assert float(rows[0]["mask-A"]) >= me[0].shape[1]
    with pytest.raises(Exception, match="mask.packed"):
        cfg_with({"mask": {"packed": True}}, "fp32")


def test_activation_checkpointing_leaves_the_global_rng_alone():
    """The data thread draws reference-mode mask positions from the global RNG while the step runs.
    A checkpointed block's backward recompute must not rewind it: torch's default
    (preserve_rng_state=True) sets the RNG back to the forward's state for the recompute and then
    restores it, so anything drawn meanwhile is drawn twice or lost. A hook inside the block draws
    once in the forward and once in the recompute: both draws must advance the global RNG."""
    cfg = cfg_with({"kernels": {"attention": "naive"}, "train": {"activation_checkpointing": True}}, "fp32")
    m = build_model(cfg)
    me, mp = MultiBlockMaskSampler.from_config(cfg)(2)
    x = torch.randn(2, 3, 32, 32)
    draws = []
    m.encoder.blocks[0].attn.register_forward_pre_hook(lambda mod, args: draws.append(torch.rand(1)))
    torch.manual_seed(123)
    m(x, me, mp).backward()
    after = torch.rand(1)
    torch.manual_seed(123)
    assert [float(d) for d in draws] == [float(torch.rand(1)), float(torch.rand(1))]
    assert float(after) == float(torch.rand(1))
