"""The single-process training loop (CPU or one GPU), readable top to bottom.

Order of operations inside one optimizer step is the reference's:
lr/wd schedules -> target forward (no grad) -> context forward -> predictor -> smooth-L1
loss -> backward -> optimizer step -> zero grad -> EMA of the target encoder. Beyond
the reference: gradient accumulation, optional clipping, a non-finite guard (skip the
step like the reference's GradScaler does, or stop with a checkpoint), atomic
checkpoints with an exact resume point, SIGTERM/SIGINT -> checkpoint and exit 0.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import signal
import sys
import time

import torch

from engine.checkpoint import (build_state, load_file, paths, prune_step_checkpoints, restore,
                               save_atomic)
from engine.config import ConfigError, IJEPAConfig
from engine.diagnostics import step_stats, warnings_for
from engine.data import BatchPrefetcher, DataError, build_loader
from engine.masks import MultiBlockMaskSampler, VectorizedMaskSampler
from engine.model import build_model, is_ragged
from engine.schedules import Schedules, apply_lr_wd

log = logging.getLogger("ijepa")

CSV_COLUMNS = ["epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)", "images/s", "lr", "wd", "skipped",
               "target_std", "target_erank", "pred_std"]
DIAG_KEYS = ("target_std", "target_erank", "pred_std")


class NonFiniteError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def build_optimizer(model, cfg, device):
    kw = {}
    if cfg.optimization.fused_optimizer:
        kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.param_groups(), **kw)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, micro_batches, *, lr, wd, momentum, precision, device,
               clip_grad=None, nonfinite="skip", diagnostics=None):
    """One optimizer step over ``micro_batches`` = [(images, masks_enc, masks_pred), ...].

    ``diagnostics``: a dict to fill with collapse statistics of this step (see engine.diagnostics).
    Returns ``(mean loss, skipped)`` as device tensors (``skipped`` is 1.0 when the step had a
    non-finite loss or gradient). With a fused optimizer the skip decision stays on the device
    (the optimizer reads ``found_inf``, as under a GradScaler), so the step never waits for the
    host; otherwise one host sync decides. ``nonfinite="stop"`` always syncs and raises.
    """
    apply_lr_wd(optimizer, lr, wd)
    n = len(micro_batches)
    total = None
    for i, (images, masks_enc, masks_pred) in enumerate(micro_batches):
        with autocast(device, precision):
            if diagnostics is not None and i == 0:
                loss, z, h = model.forward_parts(images, masks_enc, masks_pred)
                diagnostics.update(step_stats(z.detach(), h))   # device tensors, no extra forward
            else:
                loss = model(images, masks_enc, masks_pred)
        (loss / n if n > 1 else loss).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    total = total / n
    params = [p for p in model.parameters() if p.grad is not None]
    found_inf = (~torch.isfinite(total)).float()
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found_inf,
                                                     torch.ones((), device=total.device))
    if nonfinite == "stop" and bool(found_inf):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite loss or gradient (loss={float(total)})")
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf   # fused AdamW skips the update (and its step count) on device
        optimizer.step()
        del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()
    # a skipped step is what the reference's GradScaler does; schedules and EMA go on
    optimizer.zero_grad(set_to_none=True)
    model.update_target(momentum)
    return total, found_inf


def mask_lengths(masks_enc, masks_pred):
    """(context, target) tokens per block: the reference's mask-A / mask-B columns; the mean
    length for ragged (packed) masks."""
    if is_ragged(masks_enc):
        mean = lambda per_sample: sum(len(m) for ms in per_sample for m in ms) / sum(len(ms) for ms in per_sample)  # noqa: E731
        return mean(masks_enc), mean(masks_pred)
    return masks_enc[0].shape[1], masks_pred[0].shape[1]


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _Progress:
    def __init__(self, total_steps, enabled, stream=sys.stderr):
        self.total, self.enabled, self.stream = total_steps, enabled, stream
        self.tty = enabled and stream.isatty()
        self.t0 = time.time()

    def update(self, step, epoch, loss, lr, ips, skipped, force=False):
        if not self.enabled:
            return
        done = step + 1
        eta = (time.time() - self.t0) / max(1, done - self.start) * (self.total - done)
        line = (f"[ep {epoch + 1} step {done}/{self.total}] loss {loss:.4f} lr {lr:.2e} "
                f"{ips:.1f} img/s ETA {int(eta // 60)}:{int(eta % 60):02d}"
                + (f" skipped {skipped}" if skipped else ""))
        if self.tty:
            print("\r" + line.ljust(100), end="" if not force else "\n", file=self.stream, flush=True)
        elif force:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.tty:
            print(file=self.stream, flush=True)


def train(cfg: IJEPAConfig, resume: bool = False, rank: int = 0, world_size: int = 1) -> dict:
    """Pretrain with ``cfg``. Returns a summary dict (steps, losses, paths, stop reason)."""
    cfg.validate()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    precision = cfg.precision
    folder, tag = cfg.logging.folder, cfg.logging.write_tag
    os.makedirs(folder, exist_ok=True)
    p = paths(folder, tag)

    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg, device)
    loader = build_loader(cfg, rank, world_size, device)
    accum = cfg.optimization.grad_accum_steps
    ipe = len(loader) // accum
    if ipe == 0:
        raise ConfigError(f"optimization.grad_accum_steps: {accum} exceeds the {len(loader)} batches per epoch")
    sched = Schedules.from_config(cfg, ipe)
    sampler = (VectorizedMaskSampler.from_config(cfg, device=device) if cfg.mask.sampler == "vectorized"
               else MultiBlockMaskSampler.from_config(cfg))
    torch.manual_seed(cfg.train.seed)   # the global RNG drives reference-mode mask placement

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        if not os.path.isfile(p["latest"]):
            raise ConfigError(f"--resume: no checkpoint at {p['latest']}; run without --resume to start fresh")
        eng = restore(load_file(p["latest"]), model, optimizer, sampler)
        step, epoch, batch_in_epoch = eng["step"], eng["epoch"], eng["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", p["latest"], step, epoch + 1, batch_in_epoch)

    from kernels.attention import attention_backend
    a = cfg.arch
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    log.info("device %s, precision %s, attention backend %s (encoder) / %s (predictor), %d steps/epoch, %d epochs",
             device, precision,
             attention_backend(device, cfg.kernels.attention, a["embed_dim"] // a["num_heads"], compute_dtype),
             attention_backend(device, cfg.kernels.attention, cfg.meta.pred_emb_dim // a["pred_num_heads"],
                               compute_dtype, packed=cfg.mask.packed), ipe, cfg.optimization.epochs)

    with open(os.path.join(folder, "params-ijepa.yaml"), "w") as f:
        import yaml
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    csv_path = os.path.join(folder, f"{tag}_r{rank}.csv")
    new_csv = not (resume and os.path.isfile(csv_path))
    csv_file = open(csv_path, "w" if new_csv else "a", newline="")
    writer = csv.writer(csv_file)
    if new_csv:
        writer.writerow(CSV_COLUMNS)
    tb = _tensorboard(cfg, folder) if rank == 0 else None

    total_steps = sched.total_steps
    max_steps = min(total_steps, cfg.train.max_steps or total_steps)
    progress = _Progress(max_steps, cfg.train.progress and rank == 0)
    progress.start = step
    losses, skipped_total, stop_reason, last_loss = [], 0, "finished", float("nan")
    diagnostics, collapse_warnings = [], []
    t_start = time.time()

    prefetch = BatchPrefetcher(loader, sampler, device, depth=cfg.data.prefetch, ragged=cfg.mask.packed)

    def save(kind):
        flush()
        prefetch.stop()   # rewinds RNG/sampler to the first unserved batch: an exact resume point
        state = build_state(model, optimizer, cfg, epoch=epoch, step=step, batch_in_epoch=batch_in_epoch,
                            loss=last_loss, sampler=sampler, world_size=world_size,
                            extra={"skipped_steps": skipped_total, "bad_files": list(loader.bad_files)})
        if rank != 0:
            return
        save_atomic(state, p["latest"])
        if kind == "step" and cfg.checkpoint.keep_last > 0:
            save_atomic(state, p["step"].format(step=step))
            prune_step_checkpoints(folder, tag, cfg.checkpoint.keep_last)
        if kind == "epoch" and cfg.checkpoint.save_every_epochs and epoch % cfg.checkpoint.save_every_epochs == 0:
            save_atomic(state, p["epoch"].format(epoch=epoch))

    window, t_window = [], [time.time()]

    def flush():
        """Write the buffered steps: the only host sync for logging, once per log_every steps."""
        nonlocal skipped_total, last_loss
        if not window:
            return
        vals = torch.stack([torch.stack([w[3], w[4]]) for w in window]).tolist()
        dt = (time.time() - t_window[0]) / len(window)
        for w, (lv, sk) in zip(window, vals):
            ep, itr, st, _, _, ka, kb, nimg, dg = w
            skipped_total += int(sk)
            last_loss = lv
            losses.append(lv)
            dg = {k: float(v) for k, v in dg.items()} if dg else {}
            if dg:
                diagnostics.append({"step": st, **dg})
                for msg in warnings_for(dg):
                    collapse_warnings.append((st, msg))
                    log.warning("step %d: %s", st + 1, msg)
            writer.writerow([ep + 1, itr, f"{lv:.5f}", f"{ka:g}", f"{kb:g}", int(dt * 1000), f"{nimg / dt:.1f}",
                             f"{sched.lr(st):.3e}", f"{sched.wd(st):.3e}", skipped_total]
                            + [f"{dg[k]:.4g}" if k in dg else "" for k in DIAG_KEYS])
            if tb is not None:
                tb.add_scalar("train/loss", lv, st)
                tb.add_scalar("train/lr", sched.lr(st), st)
                tb.add_scalar("train/images_per_s", nimg / dt, st)
                for k, v in dg.items():
                    tb.add_scalar(f"collapse/{k}", v, st)
        w = window[-1]
        progress.update(w[2], w[0], last_loss, sched.lr(w[2]), w[7] / dt, skipped_total, force=True)
        csv_file.flush()   # the log on disk is never more than log_every steps behind
        window.clear()
        t_window[0] = time.time()

    with _StopFlag() as stop:
        while step < max_steps and epoch < cfg.optimization.epochs:
            prefetch.start(epoch, batch_in_epoch, ipe * accum - batch_in_epoch)
            while batch_in_epoch + accum <= ipe * accum and step < max_steps:
                micro = [prefetch.get() for _ in range(accum)]
                de = cfg.logging.diagnostics_every
                diag = {} if de and (step % de == 0 or step + 1 == max_steps) else None
                try:
                    loss, skipped = train_step(
                        model, optimizer, micro, lr=sched.lr(step), wd=sched.wd(step),
                        momentum=sched.momentum(step), precision=precision, device=device,
                        clip_grad=cfg.optimization.clip_grad, nonfinite=cfg.train.nonfinite,
                        diagnostics=diag)
                except NonFiniteError:
                    save("final")   # the state before this step: nothing is lost
                    csv_file.close()
                    raise
                window.append((epoch, batch_in_epoch // accum, step, loss, skipped,
                               *mask_lengths(micro[0][1], micro[0][2]), accum * len(micro[0][0]), diag))
                step += 1
                batch_in_epoch += accum
                if step % cfg.logging.log_every == 0 or step == max_steps:
                    flush()
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    save("step")
                    csv_file.flush()
                    prefetch.start(epoch, batch_in_epoch, ipe * accum - batch_in_epoch)
                out_of_time = cfg.train.max_minutes and (time.time() - t_start) / 60 >= cfg.train.max_minutes
                if stop.signal is not None or out_of_time:
                    stop_reason = (f"signal {signal.Signals(stop.signal).name}" if stop.signal is not None
                                   else "time limit")
                    break
            if stop_reason != "finished":
                break
            prefetch.stop()
            if batch_in_epoch + accum > ipe * accum:   # epoch complete
                epoch += 1
                batch_in_epoch = 0
                save("epoch")
        progress.close()
        if stop_reason == "finished" and step >= max_steps and batch_in_epoch != 0:
            stop_reason = "max_steps"
        save("final")
    csv_file.close()
    if tb is not None:
        tb.close()
    if loader.bad_files:
        log.warning("%d unreadable image(s) were skipped and replaced; first: %s",
                    len(loader.bad_files), loader.bad_files[0])
    return {"steps": step, "epoch": epoch, "losses": losses, "skipped": skipped_total,
            "stop_reason": stop_reason, "checkpoint": p["latest"], "csv": csv_path, "folder": folder,
            "bad_files": list(loader.bad_files), "model": model, "diagnostics": diagnostics,
            "collapse_warnings": collapse_warnings}


def _tensorboard(cfg, folder):
    if not cfg.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:   # tensorboard not installed: logging goes on without it
        log.warning("TensorBoard disabled (%s)", e)
        return None
    return SummaryWriter(os.path.join(folder, "tb"))


# ----------------------------------------------------------------- CLI
def add_parser(sub):
    p = sub.add_parser("train", help="pretrain I-JEPA from a config file",
                       description="Pretrain I-JEPA. The config is the reference's YAML layout (its files load "
                                   "unchanged) plus the engine's sections; see configs/.")
    p.add_argument("--config", required=True, help="YAML config file (engine or reference format)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one config value, e.g. data.batch_size=32 (repeatable; value parsed as YAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue from {logging.folder}/{write_tag}-latest.pth.tar exactly where it stopped")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None,
                   help="train through DeepSpeed ZeRO at this stage (launch with torchrun/deepspeed for >1 rank)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = IJEPAConfig.from_yaml(args.config, args.override)
    if args.quiet:
        cfg.train.progress = False
    try:
        if args.zero is not None or cfg.deepspeed is not None:
            from engine.distributed import train_deepspeed
            out = train_deepspeed(cfg, zero_stage=args.zero, resume=args.resume)
        else:
            out = train(cfg, resume=args.resume)
    except DataError as e:
        raise ConfigError(str(e)) from None
    except NonFiniteError as e:
        print(f"ijepa: stopped: {e}; checkpoint kept at {paths(cfg.logging.folder, cfg.logging.write_tag)['latest']}",
              file=sys.stderr)
        return 1
    print(f"trained {out['steps']} steps ({out['stop_reason']}); last loss "
          f"{out['losses'][-1] if out['losses'] else float('nan'):.4f}", file=sys.stderr)
    print(f"checkpoint: {out['checkpoint']}\nlog: {out['csv']}", file=sys.stderr)
    return 0
