"""What differs between backends, behind one small interface: the training loop never branches.

``Strategy`` is what ``engine.train`` calls: the forward (always ``IJEPA.forward``), backward,
the optimizer step with its non-finite guard, the EMA of the target encoder, reductions across
ranks, and checkpoints. Two implementations:

* ``LocalStrategy`` (this file): one process, CPU or one GPU.
* ``ZeroStrategy`` (``engine/zero.py``): DeepSpeed ZeRO 0-3 over any number of ranks.

``engine.train.make_strategy`` picks one; ``check_supported`` refuses, before any work and in one
line, every config key the chosen backend cannot honour (``UNSUPPORTED``); every other key means
the same on both.
"""
from __future__ import annotations

import contextlib

import torch

from engine.checkpoint import Snapshot, paths, prune_step_checkpoints, save_atomic
from engine.errors import ConfigError
from engine.model import build_model
from engine.schedules import apply_lr_wd

# (config key, value or None for "any", backend) -> why it cannot be honoured. Every key not
# listed here is honoured by every backend (tests/test_backends.py walks the table).
UNSUPPORTED = {
    # measured with deepspeed 0.19.8: dynamo fails on the gather bookkeeping ZeRO-3 keeps on every parameter
    ("train.compile", True, "zero3"): "torch.compile cannot trace ZeRO-3's per-block parameter gathering; use "
                                      "ZeRO 0-2 with train.compile, or train.compile=false",
}


def check_supported(cfg, backend: str) -> None:
    """One-line ``ConfigError`` for the first key ``backend`` cannot honour."""
    for (key, value, where), why in UNSUPPORTED.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        if where == backend and (value is None or got == value):
            raise ConfigError(f"{key}={got!r} is not supported under {backend}: {why}")


def build_optimizer(model, cfg):
    """The reference's four AdamW groups. ``optimization.fused_optimizer`` (default): one fused
    kernel per step that also skips a non-finite step on the device (no host sync); off: torch's
    default AdamW, whose skip decision needs one host sync per step."""
    return torch.optim.AdamW(model.param_groups(), fused=bool(cfg.optimization.fused_optimizer))


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name}: no CUDA device is visible here; use {what}{'=' if '.' in what else ' '}cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}: {name!r} is not a device; use cpu, cuda or auto") from None


class Strategy:
    """The interface; attributes: ``model`` (an ``IJEPA``), ``device``, ``precision``, ``rank``,
    ``world``, ``name`` (``local``, ``zero0`` ... ``zero3``)."""

    rank, world = 0, 1

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, images, masks_enc, masks_pred):
        """(loss, predictions, targets) of one micro-batch."""
        return self.model(images, masks_enc, masks_pred, parts=True)

    def backward(self, loss):
        loss.backward()

    def set_lr_wd(self, lr: float, wd: float) -> None:
        apply_lr_wd(self.optimizer, lr, wd)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def step(self, clip_grad) -> torch.Tensor:
        """Clip, then update -- or skip when a loss or gradient is not finite. Returns the skip flag
        as a 0-dim device tensor (1.0 = skipped)."""
        raise NotImplementedError

    def update_target(self, momentum: float) -> None:
        raise NotImplementedError

    def save(self, folder: str, tag: str, progress: dict, kind: str) -> str:
        raise NotImplementedError

    def load(self, snap: Snapshot) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalStrategy(Strategy):
    """One process on the CPU or one GPU."""

    name = "local"

    def __init__(self, cfg, device=torch.device("cpu"), model=None):
        self.cfg, self.device, self.precision = cfg, torch.device(device), cfg.precision
        self.model = build_model(cfg, self.device) if model is None else model
        self.accum = cfg.optimization.grad_accum_steps
        self.optimizer = build_optimizer(self.model, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self._one = torch.ones((), device=device)

    def backward(self, loss):
        (loss / self.accum if self.accum > 1 else loss).backward()

    def step(self, clip_grad):
        found_inf = torch.zeros((), device=self.device)
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self._one)
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, clip_grad, foreach=True)
        if self.fused:   # the fused kernel reads found_inf and leaves params, moments and step alone
            self.optimizer.found_inf = found_inf
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bool(found_inf):
            self.optimizer.step()
        # a skipped step is what the reference's GradScaler does; schedules and EMA go on
        self.optimizer.zero_grad(set_to_none=True)
        return found_inf

    def update_target(self, momentum):
        self.model.update_target(momentum)

    # ---------------------------------------------------------------- checkpoints
    def state(self, progress: dict) -> dict:
        """The single-file checkpoint: the reference's keys plus the ``engine`` resume entry."""
        cfg = self.cfg
        return {**self.model.reference_state_dict(module_prefix=True),
                "opt": self.optimizer.state_dict(), "scaler": None,
                "epoch": progress["epoch"], "loss": float(progress.get("loss", float("nan"))),
                "batch_size": cfg.data.batch_size, "world_size": progress.get("world_size", 1),
                "lr": cfg.optimization.lr,
                "engine": {"format": 2, "config": cfg.to_dict(), "strategy": self.name,
                           "precision": self.precision, **progress}}

    def save(self, folder, tag, progress, kind):
        p = paths(folder, tag)
        state = self.state(progress)
        save_atomic(state, p["latest"])
        if kind == "step" and self.cfg.checkpoint.keep_last > 0:
            save_atomic(state, p["step"].format(step=progress["step"]))
            prune_step_checkpoints(folder, tag, self.cfg.checkpoint.keep_last)
        every = self.cfg.checkpoint.save_every_epochs
        if kind == "epoch" and every and progress["epoch"] % every == 0:
            save_atomic(state, p["epoch"].format(epoch=progress["epoch"]))
        return p["latest"]

    @torch.no_grad()
    def load(self, snap):
        for part in ("encoder", "predictor"):
            for n, p in getattr(self.model, part).named_parameters():
                p.copy_(snap.tensor("weights", f"{part}.{n}"))
        for n, p in self.model.target_encoder.named_parameters():
            p.copy_(snap.tensor("target", n))
        load_adamw(self.optimizer, snap)


def load_adamw(optimizer, snap, names=None) -> None:
    """Put a snapshot's Adam moments, step count and group hyper-parameters into a torch AdamW
    built over the reference's four groups (``names``: its parameters' names, group by group)."""
    names = names or snap.meta["param_names"]
    fresh = optimizer.state_dict()["param_groups"]
    state, groups, i = {}, [], 0
    moments = set(snap.names("exp_avg"))
    for g, group_names in enumerate(names):
        ids = []
        for n in group_names:
            if n in moments and snap.meta["adam_step"]:
                state[i] = {"step": torch.tensor(float(snap.meta["adam_step"])),
                            "exp_avg": snap.tensor("exp_avg", n), "exp_avg_sq": snap.tensor("exp_avg_sq", n)}
            ids.append(i)
            i += 1
        saved = (snap.meta.get("param_hparams") or [{}] * len(names))[g]
        keep = {k: v for k, v in saved.items() if k in ("lr", "betas", "eps", "weight_decay", "WD_exclude")}
        groups.append({**fresh[g], **keep, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
