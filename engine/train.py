"""The training loop, for one process and for DeepSpeed ZeRO alike, read top to bottom.

One optimizer step (``train_step``) is the reference's order: lr/wd schedules -> for each
micro-batch: target forward (no grad), context forward, predictor, smooth-L1 loss, backward ->
optimizer step (skipped on the device when a loss or gradient is not finite, as the reference's
GradScaler skips it) -> EMA of the target encoder. Everything that differs between backends
lives behind ``engine.strategy.Strategy``; this file never asks which one runs.

No host sync per step: losses, skip flags and collapse statistics stay on the device and are
read once per logging window (``logging.log_every`` steps) in one collective that also agrees
the stop requests (a signal, the time limit) across ranks. What still syncs, by choice:
``train.nonfinite: stop`` (checks every step, so it can stop before the bad step's EMA),
``optimization.fused_optimizer: false`` (torch's unfused AdamW cannot skip on the device), and
DeepSpeed's own gradient-norm check in fp32 and ZeRO-3 runs.

Beyond the reference: gradient accumulation, clipping, collapse diagnostics, atomic checkpoints
with an exact resume point (also across backends and rank counts), SIGTERM/SIGINT -> checkpoint
and exit 0, a wall-time limit.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import signal
import sys
import time

import torch
from torch.profiler import record_function

from engine.checkpoint import Snapshot, find_resume_point
from engine.config import IJEPAConfig
from engine.data import BatchPrefetcher, TrainLoader, build_dataset
from engine.diagnostics import DIAG_KEYS, step_stats, summarise, warnings_for
from engine.distributed import _test_fault
from engine.errors import ConfigError, DataError, NonFiniteError
from engine.masks import MultiBlockMaskSampler, VectorizedMaskSampler
from engine.model import mask_lengths
from engine.schedules import Schedules
from engine.strategy import LocalStrategy, check_supported, resolve_device

log = logging.getLogger("ijepa")

CSV_COLUMNS = ["epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)", "images/s", "lr", "wd", "skipped",
               *DIAG_KEYS]


# ============================================================================ one step
def train_step(strategy, micro_batches, *, lr, wd, momentum, clip_grad=None, nonfinite="skip", diagnostics=None):
    """One optimizer step over ``[(images, masks_enc, masks_pred), ...]`` (this rank's micro-batches).

    Returns ``(mean loss, skipped)`` as 0-dim device tensors; ``skipped`` is 1.0 when the update
    was skipped because a loss or gradient was not finite. ``diagnostics``: a dict to fill with
    the collapse statistics of this step's first micro-batch (device tensors, no extra forward).
    Each phase is a ``record_function`` range: ``ijepa profile`` times this step, not a copy.
    """
    strategy.set_lr_wd(lr, wd)
    total = None
    for i, (images, masks_enc, masks_pred) in enumerate(micro_batches):
        with strategy.autocast():
            loss, z, h = strategy.forward(images, masks_enc, masks_pred)
        if diagnostics is not None and i == 0:
            diagnostics.update(step_stats(z.detach(), h))
        with record_function("ijepa::backward"):
            strategy.backward(poison_if_nonfinite(loss))
        total = loss.detach().float() if total is None else total + loss.detach().float()
    total = total / len(micro_batches)
    with record_function("ijepa::optimizer"):
        skipped = strategy.step(clip_grad)
    if nonfinite == "stop" and bool(skipped):   # the one host sync of stop mode, before the EMA moves
        raise NonFiniteError(f"non-finite loss or gradient (loss={float(total)}); the update was not applied")
    with record_function("ijepa::ema"):
        strategy.update_target(momentum)
    return total, skipped


def poison_if_nonfinite(loss):
    """``loss`` with the same value and the same gradients, except that a non-finite loss makes its
    gradients NaN. Every backend then skips the step on its one gradient check (the local check,
    DeepSpeed's all-reduced norm, agreed by all ranks), with no host sync and no extra collective --
    a loss can be infinite while its gradients are finite (smooth L1's gradient is clamped)."""
    d = loss.detach()
    return loss * (d - d + 1)   # x * 1 is exact; inf - inf and NaN give NaN


# ============================================================================ the loop
def train(cfg: IJEPAConfig, resume: bool = False, zero_stage=None) -> dict:
    """Pretrain with ``cfg`` (``zero_stage`` or a ``deepspeed:`` section: through DeepSpeed).
    Returns a summary: steps, losses, stop reason, checkpoint path, diagnostics, the strategy."""
    cfg.validate()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    strategy = make_strategy(cfg, zero_stage)
    rank, world, device = strategy.rank, strategy.world, strategy.device
    folder, tag = cfg.logging.folder, cfg.logging.write_tag
    os.makedirs(folder, exist_ok=True)

    loader = build_loader(cfg, rank, world, device)
    accum = cfg.optimization.grad_accum_steps
    ipe = len(loader) // accum
    if ipe == 0:
        raise ConfigError(f"optimization.grad_accum_steps: {accum} exceeds the {len(loader)} batches per epoch "
                          f"per rank ({world} rank(s)); lower it or data.batch_size")
    sched = Schedules.from_config(cfg, ipe)
    sampler = build_sampler(cfg, rank, device)
    torch.manual_seed(cfg.train.seed)   # reference-mode mask placement draws from the global RNG
    max_steps = min(sched.total_steps, cfg.train.max_steps or sched.total_steps)

    pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "loss": float("nan")}
    if resume:
        path, _ = find_resume_point(folder, tag)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint of '{tag}' in {folder}; run without --resume to start fresh")
        snap = Snapshot(path)
        strategy.load(snap)
        pos = resume_position(snap.meta, cfg, world, ipe)
        sampler.load_state_dict(snap.meta["sampler"])
        torch.set_rng_state(snap.meta["rng_cpu"])
        if device.type == "cuda" and snap.meta.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(snap.meta["rng_cuda"], device)
        loader.bad_files.extend(snap.meta.get("bad_files") or [])
        log.info("resumed from %s (%s, %d rank(s)) at step %d (epoch %d, batch %d)", path, snap.meta["strategy"],
                 snap.meta["world_size"], pos["step"], pos["epoch"] + 1, pos["batch_in_epoch"])
    log.info("%s, %d rank(s), device %s, precision %s, attention %s, %d steps/epoch, global batch %d",
             strategy.name, world, device, cfg.precision, strategy.model.resolve_attention(measure=False), ipe,
             cfg.data.batch_size * accum * world)
    if rank == 0:
        import yaml
        with open(os.path.join(folder, "params-ijepa.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    run_log = RunLog(cfg, strategy, sched, max_steps, pos, resume)
    prefetch = BatchPrefetcher(loader, sampler, device, depth=cfg.data.prefetch, packed=cfg.mask.packed)
    last_saved = pos["step"] if resume else -1

    def save(kind):
        nonlocal last_saved
        run_log.flush()
        prefetch.stop()   # rewinds the RNG and sampler to the first unserved batch: an exact resume point
        if pos["step"] == last_saved:
            return
        progress = {**pos, "loss": run_log.last_loss, "skipped_steps": run_log.skipped, "world_size": world,
                    "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "bad_files": list(loader.bad_files)}
        run_log.checkpoint = strategy.save(folder, tag, progress, kind)
        last_saved = pos["step"]

    stop_reason = None
    with StopFlag() as stop:
        while pos["step"] < max_steps and pos["epoch"] < cfg.optimization.epochs and stop_reason is None:
            per_epoch = ipe * accum
            prefetch.start(pos["epoch"], pos["batch_in_epoch"], per_epoch - pos["batch_in_epoch"])
            while pos["batch_in_epoch"] + accum <= per_epoch and pos["step"] < max_steps:
                _test_fault(rank, pos["step"])
                step = pos["step"]
                micro = [prefetch.get() for _ in range(accum)]
                every = cfg.logging.diagnostics_every
                diag = {} if every and (step % every == 0 or step + 1 == max_steps) else None
                try:
                    loss, skipped = train_step(
                        strategy, micro, lr=sched.lr(step), wd=sched.wd(step), momentum=sched.momentum(step),
                        clip_grad=cfg.optimization.clip_grad, nonfinite=cfg.train.nonfinite, diagnostics=diag)
                except NonFiniteError as e:
                    save("final")   # the state before this step: nothing is lost
                    raise NonFiniteError(f"step {step + 1}: {e}; checkpoint kept at {run_log.checkpoint}") from None
                run_log.append(pos, loss, skipped, mask_lengths(*micro[0][1:]), accum * len(micro[0][0]), diag)
                pos["step"] += 1
                pos["batch_in_epoch"] += accum
                if pos["step"] % cfg.logging.log_every == 0 or pos["step"] == max_steps:
                    out_of_time = bool(cfg.train.max_minutes and run_log.minutes() >= cfg.train.max_minutes)
                    sig, late = run_log.flush(stop=(stop.signal is not None, out_of_time))
                    if sig or late:
                        stop_reason = (f"signal {signal.Signals(stop.signal).name}" if stop.signal is not None
                                       else "signal on another rank") if sig else "time limit"
                        break
                if cfg.checkpoint.every_steps and pos["step"] % cfg.checkpoint.every_steps == 0:
                    save("step")
                    prefetch.start(pos["epoch"], pos["batch_in_epoch"], per_epoch - pos["batch_in_epoch"])
            prefetch.stop()
            if stop_reason is None and pos["batch_in_epoch"] + accum > per_epoch:   # epoch complete
                pos["epoch"] += 1
                pos["batch_in_epoch"] = 0
                save("epoch")
        if stop_reason is None:
            stop_reason = "max_steps" if pos["step"] >= max_steps and pos["batch_in_epoch"] != 0 else "finished"
        save("final")
    run_log.close()
    strategy.close()
    if loader.bad_files:
        log.warning("%d unreadable image(s) were skipped and replaced; first: %s", len(loader.bad_files),
                    loader.bad_files[0])
    return {"steps": pos["step"], "epoch": pos["epoch"], "losses": run_log.losses, "skipped": run_log.skipped,
            "stop_reason": stop_reason, "checkpoint": run_log.checkpoint, "csv": run_log.csv_path,
            "folder": folder, "bad_files": list(loader.bad_files), "diagnostics": run_log.diagnostics,
            "collapse_warnings": run_log.collapse_warnings, "strategy": strategy, "model": strategy.model,
            "world_size": world, "sampler": sampler, "loader": loader, "prefetch_depth": prefetch.depth,
            "windows": run_log.windows}


# ============================================================================ building blocks
def make_strategy(cfg, zero_stage=None):
    """The backend: one process (``LocalStrategy``), or DeepSpeed ZeRO (``engine.zero``) when
    ``--zero`` or a ``deepspeed:`` section asks for it. Keys it cannot honour are refused first."""
    if zero_stage is None and cfg.deepspeed is None:
        check_supported(cfg, "local")
        return LocalStrategy(cfg, resolve_device(cfg.train.device))
    from engine.zero import ZeroStrategy, resolve_zero_stage
    stage = resolve_zero_stage(cfg, zero_stage)
    check_supported(cfg, f"zero{stage}")
    return ZeroStrategy(cfg, stage)


def build_loader(cfg, rank=0, world_size=1, device=torch.device("cpu")):
    """The loader ``data.loader`` names: ``torch`` (portable) or ``dali``; ``auto`` = DALI on a GPU
    for image folders (on a CPU the crops a run sees should not depend on whether DALI is there)."""
    d = cfg.data
    kind = "torch" if d.loader == "auto" and (device.type != "cuda" or d.dataset != "imagefolder") else d.loader
    if kind == "dali" and d.dataset != "imagefolder":
        raise DataError(f"data.loader: dali reads image folders only (data.dataset is {d.dataset!r}); "
                        f"use data.loader: torch")
    if kind in ("dali", "auto"):
        try:
            from engine import data_dali
        except ImportError as e:
            if kind == "dali":
                raise DataError(f"data.loader: dali requested but unavailable ({e}); "
                                f"pip install nvidia-dali-cuda130==2.4.0 or use data.loader: torch") from None
        else:
            return data_dali.build_dali_loader(cfg, rank, world_size, device)
    return TrainLoader(build_dataset(cfg), d.batch_size, rank, world_size, seed=cfg.train.seed,
                       num_workers=d.num_workers, pin_memory=d.pin_mem, device=device)


def build_sampler(cfg, rank: int, device):
    """``mask.sampler``. In ``reference`` mode every rank draws identically, as the reference's
    ranks do (same seed); in ``paper`` mode each rank's positions are offset by its rank."""
    offset = {"seed_offset": rank} if cfg.mask.mode == "paper" else {}
    if cfg.mask.sampler == "vectorized":
        return VectorizedMaskSampler.from_config(cfg, device=device, **offset)
    return MultiBlockMaskSampler.from_config(cfg, **offset)


def resume_position(meta: dict, cfg, world: int, ipe: int) -> dict:
    """Where a resumed run continues. Same global batch layout: exactly where it stopped. Another
    rank count, batch size or accumulation: the same epoch, and as far into it as the samples
    already seen (rounded down to a whole step); the step follows from that position with the
    new steps per epoch, so the lr / wd / EMA schedules keep their place in the run. The data
    order inside the epoch changes with the rank count (each rank reads its own shard of the
    epoch's permutation), so a few images of the interrupted epoch may be seen twice or not at all."""
    saved = meta["config"]
    accum = cfg.optimization.grad_accum_steps
    before = (meta["world_size"], saved["data"]["batch_size"], saved["optimization"]["grad_accum_steps"])
    now = (world, cfg.data.batch_size, accum)
    pos = {k: meta[k] for k in ("step", "epoch", "batch_in_epoch")}
    pos.update(skipped_steps=meta.get("skipped_steps") or 0, loss=meta.get("loss", float("nan")))
    if before != now:
        seen = meta["batch_in_epoch"] * before[1] * before[0]
        steps = min(seen // (now[1] * now[0] * accum), ipe)
        pos.update(batch_in_epoch=steps * accum, step=meta["epoch"] * ipe + steps)
        log.warning("resuming a run of %d rank(s) x batch %d x accumulation %d on %d x %d x %d: epoch %d continues "
                    "after %d of its samples, at step %d", *before, *now, pos["epoch"] + 1, seen, pos["step"])
    return pos


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next window and exits 0."""

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


class RunLog:
    """The steps of the current window, kept on the device, and everything that reads them: the
    CSV log (the reference's columns plus images/s, lr, wd, skipped and the collapse statistics),
    TensorBoard, the progress bar and the collapse warnings."""

    def __init__(self, cfg, strategy, sched, max_steps, pos, resume):
        self.cfg, self.strategy, self.sched = cfg, strategy, sched
        self.rank, self.world, self.device = strategy.rank, strategy.world, strategy.device
        folder, tag = cfg.logging.folder, cfg.logging.write_tag
        self.csv_path = os.path.join(folder, f"{tag}_r{self.rank}.csv")
        new = not (resume and os.path.isfile(self.csv_path))
        self.csv_file = open(self.csv_path, "w" if new else "a", newline="")
        self.writer = csv.writer(self.csv_file)
        if new:
            self.writer.writerow(CSV_COLUMNS)
        self.tb = _tensorboard(cfg, folder) if self.rank == 0 else None
        self.bar = _progress_bar(max_steps, pos["step"], cfg.train.progress and self.rank == 0)
        self.window, self.losses, self.diagnostics, self.collapse_warnings = [], [], [], []
        self.windows = 0   # windows read so far
        self.skipped, self.last_loss = pos.get("skipped_steps", 0), pos.get("loss", float("nan"))
        self.checkpoint = None
        self.t_start = self.t_window = time.time()

    def minutes(self) -> float:
        return (time.time() - self.t_start) / 60

    def append(self, pos, loss, skipped, lengths, images, diag):
        self.window.append((pos["epoch"], pos["batch_in_epoch"] // self.cfg.optimization.grad_accum_steps,
                            pos["step"], loss, skipped, lengths, images, diag))

    def flush(self, stop=(False, False)):
        """Read the window: ONE host sync (and one collective across ranks). Returns the stop
        requests as agreed by every rank."""
        n = len(self.window)
        diag_keys = [k for k in DIAG_KEYS if any(w[7] for w in self.window)]
        parts = [torch.stack([w[3] for w in self.window]) if n else torch.zeros(0, device=self.device),
                 torch.stack([w[4] for w in self.window]) if n else torch.zeros(0, device=self.device),
                 torch.tensor([float(s) for s in stop], device=self.device)]
        diag_at = [i for i, w in enumerate(self.window) if w[7]]
        for i in diag_at:
            stats = summarise(self.window[i][7])
            parts.append(torch.stack([stats[k].float() for k in diag_keys]))
        with record_function("ijepa::log_window"):
            vals = self.strategy.sum_over_ranks(torch.cat([p.float().reshape(-1) for p in parts])).tolist()
        losses = [v / self.world for v in vals[:n]]
        skipped = [v > 0 for v in vals[n:2 * n]]
        agreed = [v > 0 for v in vals[2 * n:2 * n + 2]]
        diags, off = {}, 2 * n + 2
        for i in diag_at:
            diags[i] = {k: v / self.world for k, v in zip(diag_keys, vals[off:off + len(diag_keys)])}
            diags[i]["target_rows"] = self.window[i][7]["target_rows"]
            off += len(diag_keys)
        if n:
            self._write(losses, skipped, diags)
            self.windows += 1
        self.window.clear()
        self.t_window = time.time()
        return agreed

    def _write(self, losses, skipped, diags):
        dt = (time.time() - self.t_window) / len(losses)
        for i, (w, loss, sk) in enumerate(zip(self.window, losses, skipped)):
            epoch, itr, step, _, _, (ka, kb), images, _ = w
            self.skipped += int(sk)
            self.last_loss = loss
            self.losses.append(loss)
            dg = diags.get(i, {})
            if dg:
                self.diagnostics.append({"step": step, **dg})
                for msg in warnings_for(dg):
                    self.collapse_warnings.append((step, msg))
                    log.warning("step %d: %s", step + 1, msg)
            ips = images * self.world / dt
            self.writer.writerow([epoch + 1, itr, f"{loss:.5f}", f"{ka:g}", f"{kb:g}", int(dt * 1000), f"{ips:.1f}",
                                  f"{self.sched.lr(step):.3e}", f"{self.sched.wd(step):.3e}", self.skipped]
                                 + [f"{dg[k]:.4g}" if k in dg else "" for k in DIAG_KEYS])
            if self.tb is not None:
                for name, v in (("train/loss", loss), ("train/lr", self.sched.lr(step)), ("train/images_per_s", ips),
                                *((f"collapse/{k}", dg[k]) for k in DIAG_KEYS if k in dg)):
                    self.tb.add_scalar(name, v, step)
        self.csv_file.flush()   # the log on disk is never more than one window behind
        if self.bar is not None:
            step = self.window[-1][2] + 1
            status = (f"ep {self.window[-1][0] + 1} loss {self.last_loss:.4f} lr {self.sched.lr(step - 1):.2e} "
                      f"{ips:.1f} img/s" + (f" skipped {self.skipped}" if self.skipped else ""))
            self.bar.update(step - self.bar.n)
            if self.bar.disable:   # not a terminal (a log file, SLURM output): one plain line per window
                log.info("step %d/%d %s", step, self.bar.total, status)
            else:
                self.bar.set_postfix_str(status, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.csv_file.close()
        if self.tb is not None:
            self.tb.close()


def _progress_bar(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    # a live bar on a terminal; elsewhere tqdm's carriage returns would pile up in one line of the log,
    # so the bar is off there and RunLog logs each window instead
    return tqdm(total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty(), leave=True)


def _tensorboard(cfg, folder):
    if not cfg.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:   # tensorboard not installed: logging goes on without it
        log.warning("TensorBoard disabled (%s)", e)
        return None
    return SummaryWriter(os.path.join(folder, "tb"))


# ============================================================================ CLI
def add_parser(sub):
    p = sub.add_parser("train", help="pretrain I-JEPA from a config file (one process, or DeepSpeed ZeRO 0-3)",
                       description="Pretrain I-JEPA. The config is the reference's YAML layout (its files load "
                                   "unchanged) plus the engine's sections; see configs/. One process by default; "
                                   "--zero N (or a deepspeed: section) trains through DeepSpeed ZeRO-N, on as many "
                                   "ranks as the launcher (torchrun, deepspeed, srun) starts.")
    p.add_argument("--config", required=True, help="YAML config file (engine or reference format)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one config value, e.g. data.batch_size=32 (repeatable; value parsed as YAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in logging.folder: exactly where it stopped, or, "
                        "after a change of backend or rank count, from the same place in the run")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None,
                   help="train through DeepSpeed ZeRO at this stage (launch with torchrun/deepspeed for >1 rank)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = IJEPAConfig.from_yaml(args.config, args.override)
    if args.quiet:
        cfg.train.progress = False
    out = train(cfg, resume=args.resume, zero_stage=args.zero)
    if out["world_size"] == 1 or out["strategy"].rank == 0:
        last = out["losses"][-1] if out["losses"] else math.nan
        print(f"trained {out['steps']} steps ({out['stop_reason']}); last loss {last:.4f}", file=sys.stderr)
        print(f"checkpoint: {out['checkpoint']}\nlog: {out['csv']}", file=sys.stderr)
    return 0
