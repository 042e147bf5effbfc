"""Run the reference implementation's training step in-process, from the user's checkout.

The reference cannot run its own ``src/train.py`` on one process (it hard-codes an NCCL
process group and wraps every module in DDP), so this harness imports only its building
blocks at run time -- ``src.models.vision_transformer``, ``src.helper`` (``init_model``,
``init_opt``), ``src.masks.utils.apply_masks``, ``src.utils.tensors.repeat_interleave_batch``,
``src.utils.logging.grad_logger`` and ``src.utils.distributed.AllReduce`` when present --
and replays ``train.py``'s step with them, in its order:

schedulers step -> (autocast) target forward under no_grad, ``F.layer_norm``, ``apply_masks``,
``repeat_interleave_batch`` -> context forward -> predictor -> ``F.smooth_l1_loss`` (+ AllReduce,
an identity without a process group) -> backward -> AdamW step (through the GradScaler that
``init_opt`` returns when bf16 is on) -> ``grad_logger`` (one host sync per weight tensor) ->
``zero_grad`` -> per-parameter EMA loop -> ``float(loss)``.

Departures, all of which can only make the reference look faster than it is:
* no DDP wrapper (a 1-rank DDP adds bucket copies, the reference cannot build one here anyway);
* autocast is ``torch.autocast(device.type, bf16)``: the reference's own
  ``torch.cuda.amp.autocast`` is a no-op on CPU, so on CPU it would silently run fp32;
* on CPU the ``torch.cuda.amp.GradScaler`` that ``init_opt`` creates disables itself
  (scale/step/update become plain calls); on CUDA it is used as the reference uses it;
* data loading and mask collation are not in the timed step (the reference runs them in
  DataLoader workers, overlapped with compute).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import sys
import types
import warnings

import torch
import torch.nn.functional as F

from engine.errors import UsageError

REQUIRED_FILES = ("src/models/vision_transformer.py", "src/helper.py", "src/masks/utils.py", "src/utils/tensors.py")


def _phase(name):
    """The reference's step phases, as ``record_function`` ranges (what ``ijepa profile`` reads)."""
    return torch.profiler.record_function(f"ijepa::{name}")


@contextlib.contextmanager
def quiet():
    """Silence the reference's prints, root-logger INFO lines and deprecation warnings."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(old)


def check_checkout(path: str) -> str:
    """Absolute path of a usable checkout, or ``UsageError`` with a one-line reason."""
    if not path or not os.path.isdir(path):
        raise UsageError(f"--reference {path}: no such directory; pass the path of a checkout of "
                         f"facebookresearch/ijepa")
    if not os.path.isdir(os.path.join(path, "src")):
        raise UsageError(f"--reference {path}: no src/ folder, so not a checkout of facebookresearch/ijepa "
                         f"(expected src/helper.py, src/models/vision_transformer.py)")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise UsageError(f"--reference {path}: missing {', '.join(missing)}; expected a checkout of "
                         f"facebookresearch/ijepa")
    return os.path.abspath(path)


def load_reference(path: str) -> types.SimpleNamespace:
    """Import the reference's modules from ``path`` (its ``src`` package)."""
    path = check_checkout(path)
    # a previously loaded checkout (another path) must not answer for this one
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]
    root = logging.getLogger()
    # src/helper.py calls logging.basicConfig(stream=sys.stdout) at import, which would route
    # every later INFO line of every library to our stdout; a handler makes that a no-op
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    sys.path.insert(0, path)
    try:
        with quiet():
            vit, helper, mutils, tensors = (importlib.import_module(f"src.{m}") for m in (
                "models.vision_transformer", "helper", "masks.utils", "utils.tensors"))
            grad_logger = allreduce = None   # optional in the reference's layout
            with contextlib.suppress(Exception):
                grad_logger = importlib.import_module("src.utils.logging").grad_logger
            with contextlib.suppress(Exception):
                allreduce = importlib.import_module("src.utils.distributed").AllReduce
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"--reference {path}: importing the reference failed ({type(e).__name__}: {first})") from None
    finally:
        sys.path.remove(path)
        if guard is not None:
            root.removeHandler(guard)
    where = os.path.abspath(getattr(vit, "__file__", "") or "")
    if not where.startswith(path + os.sep):
        raise UsageError(f"--reference {path}: 'src' resolved to {where}, not to the checkout; "
                         f"remove the other 'src' package from the Python path")
    for mod, attr in ((helper, "init_model"), (helper, "init_opt"), (mutils, "apply_masks"),
                      (tensors, "repeat_interleave_batch")):
        if not hasattr(mod, attr):
            raise UsageError(f"--reference {path}: {mod.__name__} has no {attr}; "
                             f"expected facebookresearch/ijepa's layout")
    return types.SimpleNamespace(path=path, vit=vit, helper=helper, apply_masks=mutils.apply_masks,
                                 repeat_interleave_batch=tensors.repeat_interleave_batch,
                                 grad_logger=grad_logger, allreduce=allreduce)


def check_buildable(cfg, mods) -> None:
    """The reference builds factory sizes only (``init_model`` takes a model name)."""
    from engine.config import VIT_SIZES
    name = cfg.meta.model_name
    if not hasattr(mods.vit, name):
        raise UsageError(f"meta.model_name {name!r}: the reference has no such factory; "
                         f"use one of {', '.join(VIT_SIZES)}")
    dim, depth, heads, ratio = VIT_SIZES[name]
    a = cfg.arch
    if (a["embed_dim"], a["depth"], a["num_heads"], a["mlp_ratio"], a["pred_num_heads"]) != (
            dim, depth, heads, ratio, heads):
        raise UsageError("model.* overrides cannot be built by the reference's init_model (factory sizes "
                         "only); remove the model section or run without --reference")
    if cfg.data.in_chans != 3:
        raise UsageError(f"data.in_chans {cfg.data.in_chans}: the reference's encoders take 3 channels")


class ReferenceRunner:
    """The reference's models, optimizer, schedulers and one training step."""

    name = "reference"

    def __init__(self, mods, cfg, device, precision: str, ipe: int, seed: int = 0):
        check_buildable(cfg, mods)
        self.mods, self.device, self.precision = mods, torch.device(device), precision
        o = cfg.optimization
        torch.manual_seed(seed)
        with quiet():
            enc, pred = mods.helper.init_model(
                device=self.device, patch_size=cfg.mask.patch_size, model_name=cfg.meta.model_name,
                crop_size=cfg.data.crop_size, pred_depth=cfg.meta.pred_depth, pred_emb_dim=cfg.meta.pred_emb_dim)
            self.target_encoder = copy.deepcopy(enc).requires_grad_(False)
            self.opt, self.scaler, self.sched, self.wd_sched = mods.helper.init_opt(
                encoder=enc, predictor=pred, wd=float(o.weight_decay), final_wd=float(o.final_weight_decay),
                start_lr=o.start_lr, ref_lr=o.lr, final_lr=o.final_lr, iterations_per_epoch=ipe,
                warmup=o.warmup, num_epochs=o.epochs, ipe_scale=o.ipe_scale,
                use_bfloat16=(precision == "bf16"))
        self.encoder, self.predictor = enc, pred
        e0, e1 = o.ema
        total = ipe * o.epochs * o.ipe_scale
        self.momentum = (e0 + i * (e1 - e0) / total for i in range(int(total) + 1))
        self.grad_stats = None

    def state_dicts(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "predictor": self.predictor.state_dict(),
                "target_encoder": self.target_encoder.state_dict()}

    def step(self, imgs, masks_enc, masks_pred, phase=_phase) -> float:
        m = self.mods
        scaler = self.scaler if self.precision == "bf16" else None
        with phase("schedules"):
            self.sched.step()
            self.wd_sched.step()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            with phase("target_forward"), torch.no_grad():
                h = self.target_encoder(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                B = len(h)
                h = m.apply_masks(h, masks_pred)
                h = m.repeat_interleave_batch(h, B, repeat=len(masks_enc))
            with phase("context_forward"):
                z = self.encoder(imgs, masks_enc)
            with phase("predictor"):
                z = self.predictor(z, masks_enc, masks_pred)
            with phase("loss"):
                loss = F.smooth_l1_loss(z, h)
                if m.allreduce is not None:
                    loss = m.allreduce.apply(loss)
        with phase("backward"):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        with phase("optimizer"):
            if scaler is not None:
                scaler.step(self.opt)
                scaler.update()
            else:
                self.opt.step()
        with phase("grad_logger"):
            if m.grad_logger is not None:
                self.grad_stats = m.grad_logger(self.encoder.named_parameters())
            else:   # the same work: one norm and one host sync per weight tensor
                self.grad_stats = [float(torch.norm(p.grad)) for n, p in self.encoder.named_parameters()
                                   if p.grad is not None and not (n.endswith(".bias") or p.ndim == 1)]
        with phase("zero_grad"):
            self.opt.zero_grad()
        with phase("ema"), torch.no_grad():
            mom = next(self.momentum)
            for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                k.data.mul_(mom).add_((1. - mom) * q.detach().data)
        with phase("loss_read"), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # float() of a grad-requiring scalar: what train.py does
            return float(loss)
