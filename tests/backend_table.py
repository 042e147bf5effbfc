"""The keys x backends table: every config key means the same under every backend, or is refused.

Each row sets one key and says how to see that a run honoured it: the object the loop built, a
count in its log, or its losses against the same backend's baseline run (the defaults). Used by
tests/test_backends.py for the one-process strategy and by tests/ds_harness.py (mode ``keys``)
for DeepSpeed ZeRO on 2 ranks; a key a backend cannot honour must instead be refused before any
work with one line naming it (``engine.strategy.UNSUPPORTED``).
"""
import csv
import math
import os

import numpy as np

BASE = ["train.progress=false", "train.max_steps=4", "logging.log_every=2", "data.batch_size=8",
        "logging.diagnostics_every=50", "train.threads=1"]


def _close(a, b, rel):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def _differs(a, b):
    return len(a) == len(b) and any(x != y for x, y in zip(a, b))


def _csv(out, col):
    with open(out["csv"]) as f:
        return [float(r[col]) for r in csv.DictReader(f)]


def _blocks(out):
    m = out["model"]
    return list(m.encoder.blocks) + list(m.predictor.predictor_blocks)


def check_sampler(out, base, **_):
    from engine.masks import VectorizedMaskSampler
    assert isinstance(out["sampler"], VectorizedMaskSampler), type(out["sampler"])
    assert _differs(out["losses"], base["losses"])


def check_packed(out, base, unpacked=None, **_):
    # whole masks: every step's mean context length >= the truncated one, and some step more
    packed, cut = _csv(out, "mask-A"), _csv(unpacked, "mask-A")
    assert all(p >= c for p, c in zip(packed, cut)) and any(p > c for p, c in zip(packed, cut)), (packed, cut)


def check_mode(out, base, **_):
    assert out["sampler"].mode == "paper" and _differs(out["losses"], base["losses"])


def check_prefetch(out, base, **_):
    assert out["prefetch_depth"] == 0 and out["losses"] == base["losses"]


def check_loader(out, base, **_):
    from engine.data_dali import DaliImageLoader
    assert isinstance(out["loader"], DaliImageLoader) and all(math.isfinite(x) for x in out["losses"])


def check_diagnostics(out, base, **_):
    assert len(out["diagnostics"]) == out["steps"] and len(base["diagnostics"]) < out["steps"]


def check_log_every(out, base, **_):
    assert out["windows"] == out["steps"] and base["windows"] == out["steps"] // 2


def check_stop(out, base, **_):
    assert out.get("error") == "NonFiniteError", out.get("error")


def check_checkpointing(out, base, **_):
    assert all(b.checkpointed for b in _blocks(out)) and _close(out["losses"], base["losses"], 1e-6)


def check_compile(out, base, **_):
    assert all(b._compiled_call_impl is not None for b in _blocks(out))


def check_attention(out, base, **_):
    assert {b.attn.backend for b in _blocks(out)} == {"naive"} and _close(out["losses"], base["losses"], 1e-5)


def check_gather(out, base, **_):
    m = out["model"]
    assert m.encoder.gather_backend == m.predictor.gather_backend == "torch"
    assert _close(out["losses"], base["losses"], 1e-6)


def check_ema(out, base, **_):
    s = out["strategy"]
    plan = s.target._ema if hasattr(s, "target") else s.model._ema
    assert plan.backend == "naive" and _close(out["losses"], base["losses"], 1e-5)


def check_bf16(out, base, **_):
    s = out["strategy"]
    assert s.precision == "bf16" and (not hasattr(s, "engine") or s.engine.bfloat16_enabled())
    assert _differs(out["losses"], base["losses"]) and _close(out["losses"], base["losses"], 2e-2)


def check_accum(out, base, **_):
    # two micro-batches per step: twice the batches (and masks) for the same steps
    assert out["sampler"].counter + 1 == 2 * (base["sampler"].counter + 1), (out["sampler"].counter,
                                                                              base["sampler"].counter)
    assert out["steps"] == base["steps"] and _differs(out["losses"], base["losses"])


def check_clip(out, base, **_):
    assert out["losses"][0] == base["losses"][0] and _differs(out["losses"], base["losses"])


def check_fused(out, base, **_):
    s = out["strategy"]
    adamw = s.inner if hasattr(s, "inner") else s.optimizer
    assert not adamw.defaults["fused"] and _close(out["losses"], base["losses"], 1e-6)


def check_rows(out, base, **_):
    assert out["model"].predictor.skip_unused_rows is False and _close(out["losses"], base["losses"], 1e-5)


def check_target_norm(out, base, **_):
    assert out["model"].cfg.loss.target_norm == "batch" and _differs(out["losses"], base["losses"])


# (key, overrides, check, needs): ``needs`` names extra runs a check compares against
TABLE = [
    ("mask.sampler", ["mask.sampler=vectorized"], check_sampler, ()),
    ("mask.packed", ["mask.mode=paper", "mask.packed=true"], check_packed, ("unpacked",)),
    ("mask.mode", ["mask.mode=paper"], check_mode, ()),
    ("data.prefetch", ["data.prefetch=0"], check_prefetch, ()),
    ("data.loader", ["data.loader=dali", "data.dataset=imagefolder"], check_loader, ("images",)),
    ("logging.diagnostics_every", ["logging.diagnostics_every=1"], check_diagnostics, ()),
    ("logging.log_every", ["logging.log_every=1"], check_log_every, ()),
    ("train.nonfinite", ["train.nonfinite=stop"], check_stop, ("poison",)),
    ("train.compile", ["train.compile=true"], check_compile, ("build_only",)),
    ("train.activation_checkpointing", ["train.activation_checkpointing=true"], check_checkpointing, ()),
    ("kernels.attention", ["kernels.attention=naive"], check_attention, ()),
    ("kernels.gather", ["kernels.gather=torch"], check_gather, ()),
    ("kernels.ema", ["kernels.ema=naive"], check_ema, ()),
    ("train.precision", ["train.precision=bf16"], check_bf16, ()),
    ("optimization.grad_accum_steps", ["optimization.grad_accum_steps=2"], check_accum, ()),
    ("optimization.clip_grad", ["optimization.clip_grad=0.001"], check_clip, ()),
    ("optimization.fused_optimizer", ["optimization.fused_optimizer=false"], check_fused, ()),
    ("train.skip_unused_rows", ["train.skip_unused_rows=false"], check_rows, ()),
    ("loss.target_norm", ["loss.target_norm=batch"], check_target_norm, ()),
]


def jpeg_folder(root):
    """A tiny image folder (real Fashion-MNIST images as JPEGs) for the DALI loader."""
    from PIL import Image
    from engine.data import load_fmnist
    imgs, labels = load_fmnist("train")
    for c in range(2):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i, j in enumerate(np.nonzero(labels == c)[0][:32]):
            Image.fromarray(imgs[j]).convert("RGB").resize((40, 40)).save(
                os.path.join(root, f"class{c}", f"{i:03d}.jpg"), quality=90)
    return root


def run_table(train_fn, make_cfg, backend, work, rows=TABLE, jpegs=None):
    """Runs every row under ``backend`` (``train_fn(cfg)`` trains, ``make_cfg(folder, overrides)``
    builds a config); returns ``{key: "ok" | "refused: <line>" | "failed: <why>"}``."""
    from engine.errors import ConfigError, NonFiniteError
    from engine.strategy import check_supported
    base = train_fn(make_cfg(os.path.join(work, "base"), []))
    results = {}
    for key, overrides, check, needs in rows:
        folder = os.path.join(work, key.replace(".", "_"))
        extra = {}
        try:
            images = jpegs or (jpeg_folder(os.path.join(work, "jpegs")) if "images" in needs else None)
            cfg = make_cfg(folder, overrides + ([f"data.root_path={images}"] if "images" in needs else []))
            check_supported(cfg, backend)
            if "unpacked" in needs:
                extra["unpacked"] = train_fn(make_cfg(folder + "_unpacked", ["mask.mode=paper"]))
            if "build_only" in needs:
                from engine.train import make_strategy
                s = make_strategy(cfg, None if backend == "local" else int(backend[-1]))
                out = {"model": s.model, "strategy": s}
            elif "poison" in needs:
                from engine import data
                orig = data.SyntheticDataset.__getitem__
                data.SyntheticDataset.__getitem__ = lambda self, i: (orig(self, i)[0] * float("nan"), 0, "")
                try:
                    train_fn(cfg)
                    out = {}
                except NonFiniteError:
                    out = {"error": "NonFiniteError"}
                finally:
                    data.SyntheticDataset.__getitem__ = orig
            else:
                out = train_fn(cfg)
            check(out, base, **extra)
            results[key] = "ok"
        except ConfigError as e:
            results[key] = f"refused: {e}"
        except AssertionError as e:
            results[key] = f"failed: {str(e)[:300]}"
    return results
