"""Runs under ``torch.distributed.run --nproc_per_node 2`` for tests/test_distributed.py.

``python -m torch.distributed.run ... tests/ds_harness.py MODES OUT.json WORKDIR``

equiv   For each (stage, precision, accumulation, clipping) case: the single-process strategy on the
        concatenated global batch vs ZeRO on each rank's slice, 5 steps (losses, target encoder, fp32
        weights); a checkpoint at step 3 reloaded into a fresh ZeRO strategy must replay steps 3-4 bit
        for bit; the same checkpoint exported to one file must continue in one process with the same
        losses. Plus the ZeRO-3 bf16 "target moves" check.
cross   Resume across backends and rank counts on explicit batches (so the data order is the same):
        ZeRO-2 on 2 ranks -> one process, one process -> ZeRO-3 on 2 ranks, ZeRO-3 -> ZeRO-1; each
        continuation against an uninterrupted run.
loop    ``engine.train.train`` straight vs stopped at step 3 and resumed (ZeRO-2 and ZeRO-3), and
        ZeRO-3 stopped and resumed under ZeRO-1.
keys    Every config key of the keys x backends table under ZeRO (tests/test_backends.py asserts).
syncs   Host syncs in a window of default training steps under ZeRO-2 (tests/test_syncs.py asserts).
nonfinite  NaN images for a whole epoch under every stage and precision: each step skipped.
Rank 0 writes the measurements to OUT.json; the pytest side asserts on them.
"""
import json
import math
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from engine.config import IJEPAConfig  # noqa: E402

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
STEPS, SAVE_AT, B = 5, 3, 4


def make_cfg(folder, precision="fp32", accum=1, clip=None, ema=(0.8, 0.9), extra=()):
    ov = [f"logging.folder={folder}", "train.progress=false", f"train.precision={precision}",
          f"optimization.grad_accum_steps={accum}", f"optimization.ema=[{ema[0]}, {ema[1]}]",
          f"data.batch_size={B}", "train.threads=1", *extra]
    if clip:
        ov.append(f"optimization.clip_grad={clip}")
    return IJEPAConfig.from_yaml(SMOKE, ov)


def images(step, micro, rank):
    g = torch.Generator().manual_seed(100_000 * step + 100 * micro + rank)
    return torch.randn(B, 3, 32, 32, generator=g)


def all_masks(cfg, accum):
    """Masks for every (step, micro): the same on every rank, as reference mode gives them."""
    from engine.masks import MultiBlockMaskSampler
    torch.manual_seed(cfg.train.seed)
    s = MultiBlockMaskSampler.from_config(cfg)
    return [[s(B) for _ in range(accum)] for _ in range(STEPS)]


def schedules(cfg):
    from engine.schedules import Schedules
    return Schedules.from_config(cfg, ipe=4)


def global_batch(step, micro, masks, world):
    me, mp = masks[step][micro]
    imgs = torch.cat([images(step, micro, r) for r in range(world)])
    return imgs, [torch.cat([m] * world) for m in me], [torch.cat([m] * world) for m in mp]


def run_steps(strategy, cfg, steps, world=None, rank=0):
    """Steps of ``strategy`` on explicit batches: the global batch for one process (``world``
    given), this rank's slice for ZeRO. Returns the global mean loss per step."""
    from engine.train import train_step
    accum = cfg.optimization.grad_accum_steps
    masks, sched = all_masks(cfg, accum), schedules(cfg)
    losses = []
    for step in steps:
        if world is not None:
            micro = [global_batch(step, m, masks, world) for m in range(accum)]
        else:
            micro = [(images(step, m, rank), *masks[step][m]) for m in range(accum)]
        loss, _ = train_step(strategy, micro, lr=sched.lr(step), wd=sched.wd(step), momentum=sched.momentum(step),
                             clip_grad=cfg.optimization.clip_grad)
        losses.append(float(strategy.sum_over_ranks(loss.clone())) / strategy.world)
    return losses


def local(cfg):
    from engine.strategy import LocalStrategy
    return LocalStrategy(cfg, torch.device("cpu"))


def maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def state_of(path):
    """(trainable fp32 weights, target) of a checkpoint, as full tensors."""
    from engine.checkpoint import Snapshot
    snap = Snapshot(path)
    moments = set(snap.names("exp_avg"))
    return ({n: snap.tensor("weights", n) for n in moments},
            {n: snap.tensor("target", n) for n in snap.names("target")}, snap)


def local_state(strategy):
    w = {f"{part}.{n}": p.detach().clone() for part in ("encoder", "predictor")
         for n, p in getattr(strategy.model, part).named_parameters() if p.requires_grad}
    return w, {n: p.detach().clone() for n, p in strategy.model.target_encoder.named_parameters()}


def save(strategy, folder, step):
    return strategy.save(folder, "jepa", {"step": step, "epoch": 0, "batch_in_epoch": step, "loss": 0.0,
                                          "sampler": None, "rng_cpu": torch.get_rng_state(), "world_size":
                                              strategy.world}, "step")


def barrier():
    import torch.distributed as dist
    dist.barrier()


# ============================================================================ equiv
def run_equiv(work):
    from engine.checkpoint import Snapshot
    from engine.model import build_model
    from engine.tools.convert import export
    from engine.zero import ZeroStrategy
    import torch.distributed as dist
    cases = [  # (stage, precision, accum, clip, extra overrides)
        (0, "fp32", 1, None, ()), (1, "fp32", 2, 0.5, ()), (2, "fp32", 1, None, ()), (3, "fp32", 2, 0.5, ()),
        (0, "bf16", 1, None, ()), (1, "bf16", 1, None, ()), (2, "bf16", 2, 0.5, ()), (3, "bf16", 1, None, ()),
        # targets normalised over the batch: the statistics must be the global batch's, not a rank's
        (2, "fp32", 1, None, ("loss.target_norm=batch",)),
    ]
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"cases": []}
    refs = {}
    if rank == 0:   # single-process references first: a ZeRO-3 engine swaps torch's F.linear for the process
        for case in cases:
            stage, prec, accum, clip, extra = case
            cfg = make_cfg(os.path.join(work, f"ref{stage}{prec}{len(extra)}"), prec, accum, clip, extra=extra)
            s = local(cfg)
            losses = run_steps(s, cfg, range(STEPS), world=world)
            refs[case] = (losses, *local_state(s))
    for case in cases:
        stage, prec, accum, clip, extra = case
        tc = time.time()
        tag = f"{stage}{prec}{len(extra)}"
        cfg = make_cfg(os.path.join(work, f"z{tag}"), prec, accum, clip, extra=extra)
        init_target = {n: p.detach().clone() for n, p in build_model(cfg).target_encoder.named_parameters()}
        tr = ZeroStrategy(cfg, stage)
        losses = run_steps(tr, cfg, range(SAVE_AT), rank=rank)
        ck = save(tr, os.path.join(work, f"ck{tag}"), SAVE_AT)
        losses += run_steps(tr, cfg, range(SAVE_AT, STEPS), rank=rank)
        end = save(tr, os.path.join(work, f"end{tag}"), STEPS)
        del tr
        tr2 = ZeroStrategy(cfg, stage)
        tr2.load(Snapshot(ck))
        resumed = run_steps(tr2, cfg, range(SAVE_AT, STEPS), rank=rank)
        end2 = save(tr2, os.path.join(work, f"end2{tag}"), STEPS)
        del tr2
        rec = {"stage": stage, "precision": prec, "accum": accum, "clip": clip, "extra": list(extra),
               "losses": losses, "resumed": resumed}
        if rank == 0:
            (student, target, _), (student2, target2, _) = state_of(end), state_of(end2)
            ref_losses, ref_student, ref_target = refs[case]
            at_save_student, at_save_target, snap = state_of(ck)
            rec.update(ref_losses=ref_losses, resume_target_diff=maxdiff(target, target2),
                       resume_student_diff=maxdiff(student, student2),
                       loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
                       target_diff=maxdiff(target, ref_target), target_moved=maxdiff(target, init_target),
                       student_diff=maxdiff(student, ref_student))
            out = os.path.join(work, f"export{tag}.pth.tar")
            export(ck, out, "engine")
            one = local(cfg)
            one.load(Snapshot(out))
            rec["export_step"] = Snapshot(out).meta["step"]
            rec["export_weight_diff"] = maxdiff(local_state(one)[0], at_save_student)
            rec["export_target_diff"] = maxdiff(local_state(one)[1], at_save_target)
            exp_losses = run_steps(one, cfg, range(SAVE_AT, STEPS), world=world)
            rec["export_losses"] = exp_losses
            rec["export_loss_diff"] = max(abs(a - b) for a, b in zip(exp_losses, losses[SAVE_AT:]))
        rec["seconds"] = time.time() - tc
        results["cases"].append(rec)
        barrier()
    results["moves"] = target_moves(work)
    return results


def target_moves(work):
    """ZeRO-3, bf16, the reference's momentum schedule (0.996 -> 1): the fp32 target shard must
    change every step and equal a dense fp32 EMA of the fp32 master weights; the bf16 shard must
    be its rounding; a naive in-place bf16 EMA of the same weights would have frozen."""
    import deepspeed
    from engine.model import build_model
    from engine.zero import ZeroStrategy
    import torch.distributed as dist
    cfg = make_cfg(os.path.join(work, "moves"), "bf16", ema=(0.996, 1.0))
    sched = schedules(cfg)
    init = {n: p.detach().clone() for n, p in build_model(cfg).target_encoder.named_parameters()}
    tr = ZeroStrategy(cfg, 3)
    trainable = {n for n, p in tr.model.encoder.named_parameters() if p.requires_grad}
    dense = {n: v.clone() for n, v in init.items()}
    naive = {n: v.bfloat16() for n, v in init.items()}
    prev = {n: v.clone() for n, v in init.items()}
    changed, dense_diff, bf16_mismatch = [], 0.0, 0
    for step in range(STEPS):
        m = sched.momentum(step)
        run_steps(tr, cfg, [step], rank=dist.get_rank())
        student, shadow, _ = state_of(save(tr, os.path.join(work, f"moves{step}"), step))
        for n in dense:
            src = student["encoder." + n] if n in trainable else init[n]
            dense[n] = m * dense[n] + (1 - m) * src
            naive[n] = (m * naive[n] + (1 - m) * src.bfloat16()).bfloat16()
        dense_diff = max(dense_diff, maxdiff(shadow, dense))
        tot = sum(shadow[n].numel() for n in trainable)
        changed.append(sum(int((shadow[n] != prev[n]).sum()) for n in trainable) / tot)
        prev = shadow
        params = list(tr.target.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            for n, p in tr.target.module.named_parameters():
                bf16_mismatch += int((p.data.view(shadow[n].shape) != shadow[n].bfloat16()).sum())
    # weight matrices (|w| ~ 0.02): (1 - m) * step is far below half a bf16 ulp there
    mats = [n for n in trainable if init[n].ndim >= 2]
    tot = sum(init[n].numel() for n in mats)
    naive_wrong = sum(int((naive[n] != dense[n].bfloat16()).sum()) for n in mats) / tot
    moved = {n: dense[n].bfloat16() != init[n].bfloat16() for n in mats}
    n_moved = sum(int(v.sum()) for v in moved.values())
    naive_stuck = sum(int(((naive[n] == init[n].bfloat16()) & moved[n]).sum()) for n in mats) / max(1, n_moved)
    return {"changed_fraction_per_step": changed, "dense_diff": dense_diff, "bf16_shard_mismatch": bf16_mismatch,
            "naive_bf16_wrong_fraction": naive_wrong, "naive_bf16_stuck_fraction": naive_stuck,
            "bf16_moved_fraction": n_moved / tot, "momenta": [sched.momentum(s) for s in range(STEPS)]}


# ============================================================================ cross
def run_cross(work):
    """Checkpoints move between backends and rank counts. Every continuation runs on the same
    batches as an uninterrupted run (explicit batches: the data order is the same), so its losses
    must match that run within fp32 rounding (bf16: bf16 rounding)."""
    from engine.checkpoint import Snapshot
    from engine.zero import ZeroStrategy
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for prec in ("fp32", "bf16"):
        cfg = make_cfg(os.path.join(work, f"cross{prec}"), prec, ema=(0.996, 1.0))
        straight = None
        if rank == 0:
            s = local(cfg)
            straight = run_steps(s, cfg, range(STEPS), world=world)
        # ZeRO-2 on 2 ranks -> one process
        z = ZeroStrategy(cfg, 2)
        first = run_steps(z, cfg, range(SAVE_AT), rank=rank)
        ck = save(z, os.path.join(work, f"z2{prec}"), SAVE_AT)
        del z
        if rank == 0:
            one = local(cfg)
            snap = Snapshot(ck)
            one.load(snap)
            out[f"zero2_to_local_{prec}"] = {"straight": straight, "split": first + run_steps(
                one, cfg, range(SAVE_AT, STEPS), world=world), "adam_step": snap.meta["adam_step"]}
        # one process -> ZeRO-3 on 2 ranks
        path = os.path.join(work, f"local{prec}.pth.tar")
        if rank == 0:
            one = local(cfg)
            first = run_steps(one, cfg, range(SAVE_AT), world=world)
            save_file = one.save(os.path.join(work, f"l{prec}"), "jepa", {
                "step": SAVE_AT, "epoch": 0, "batch_in_epoch": SAVE_AT, "loss": 0.0, "sampler": None,
                "rng_cpu": torch.get_rng_state()}, "step")
            os.replace(save_file, path)
        barrier()
        z = ZeroStrategy(cfg, 3)
        z.load(Snapshot(path))
        rest = run_steps(z, cfg, range(SAVE_AT, STEPS), rank=rank)
        del z
        if rank == 0:
            out[f"local_to_zero3_{prec}"] = {"straight": straight, "split": first + rest}
        # ZeRO-3 -> ZeRO-1, both on 2 ranks
        z = ZeroStrategy(cfg, 3)
        first = run_steps(z, cfg, range(SAVE_AT), rank=rank)
        ck = save(z, os.path.join(work, f"z3{prec}"), SAVE_AT)
        del z
        z = ZeroStrategy(cfg, 1)
        z.load(Snapshot(ck))
        rest = run_steps(z, cfg, range(SAVE_AT, STEPS), rank=rank)
        del z
        if rank == 0:
            out[f"zero3_to_zero1_{prec}"] = {"straight": straight, "split": first + rest}
        barrier()
    return out


# ============================================================================ loop
def run_loop(work):
    from engine.train import train
    res = {}
    extra = ("checkpoint.every_steps=2", "checkpoint.keep_last=1", "data.batch_size=8")

    def cfg(name, *more):
        return make_cfg(os.path.join(work, name), "bf16", ema=(0.996, 1.0), extra=extra + more)
    for stage in (2, 3):
        a = train(cfg(f"straight{stage}"), zero_stage=stage)
        b1 = train(cfg(f"split{stage}", "train.max_steps=3"), zero_stage=stage)
        b2 = train(cfg(f"split{stage}"), resume=True, zero_stage=stage)
        root = os.path.join(work, f"straight{stage}", "jepa-sharded")
        res[str(stage)] = {
            "straight": a["losses"], "first": b1["losses"], "second": b2["losses"],
            "steps": [a["steps"], b1["steps"], b2["steps"]], "stop": [a["stop_reason"], b1["stop_reason"]],
            "target_equal": maxdiff(state_of(a["checkpoint"])[1], state_of(b2["checkpoint"])[1]) == 0.0,
            "tags": sorted(os.listdir(root)), "latest": open(os.path.join(root, "latest")).read(),
        }
    # another stage on resume: ZeRO-3 for 3 steps, then ZeRO-1 to the end
    b1 = train(cfg("z3z1", "train.max_steps=3"), zero_stage=3)
    b2 = train(cfg("z3z1"), resume=True, zero_stage=1)
    res["3to1"] = {"straight": res["3"]["straight"], "split": b1["losses"] + b2["losses"],
                   "steps": [b1["steps"], b2["steps"]]}
    return res


# ============================================================================ syncs
def run_syncs(work):
    """Host reads in a steady window of steps (tests/sync_audit.py), per rank: the default bf16
    ZeRO-2 step, and the configurations where DeepSpeed itself reads the gradient norm back."""
    import torch.distributed as dist
    from engine.train import RunLog, train
    from engine.zero import ZeroStrategy
    from sync_audit import count_syncs, steady_syncs
    res = {}
    for name, stage, prec, clip in (("zero2_bf16", 2, "bf16", None), ("zero0_bf16", 0, "bf16", None),
                                    ("zero1_bf16", 1, "bf16", None), ("zero2_fp32", 2, "fp32", None),
                                    ("zero2_bf16_clip", 2, "bf16", 0.5), ("zero3_bf16", 3, "bf16", None)):
        cfg = make_cfg(os.path.join(work, f"syncs_{name}"), prec, clip=clip,
                       extra=("logging.log_every=2", "data.batch_size=8"))
        with count_syncs(mark=[(RunLog, "flush"), (ZeroStrategy, "save")]) as events:
            out = train(cfg, zero_stage=stage)
        mine = [e[2] for e in steady_syncs(events)]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        res[name] = {"per_rank": every, "steps": out["steps"]}
    return res


# ============================================================================ nonfinite
def run_nonfinite(work):
    """Epoch 2's images are NaN: under every stage and precision each of its steps is skipped (no
    Adam update: the step count stays at epoch 1's), the run goes on and counts them."""
    from engine import data
    from engine.train import train
    orig = data.SyntheticDataset.__getitem__

    def poisoned(self, i):
        img, label, bad = orig(self, i)
        return (img * float("nan") if self.epoch == 1 else img), label, bad
    data.SyntheticDataset.__getitem__ = poisoned
    res = {}

    def summary(out):
        return {"skipped": out["skipped"], "steps": out["steps"],
                "adam_step": state_of(out["checkpoint"])[2].meta["adam_step"],
                "nonfinite_losses": sum(not math.isfinite(l) for l in out["losses"])}
    try:
        for stage in (0, 1, 2, 3):
            for prec in ("fp32", "bf16"):
                cfg = make_cfg(os.path.join(work, f"nan{stage}{prec}"), prec, extra=("data.batch_size=8",))
                res[f"zero{stage}_{prec}"] = summary(train(cfg, zero_stage=stage))
    finally:
        data.SyntheticDataset.__getitem__ = orig
    # an infinite loss with finite gradients (+inf added as a constant) in epoch 2: skipped as well
    from engine.model import IJEPA
    forward, calls = IJEPA.forward, []

    def inf_loss(self, *a, **kw):
        calls.append(1)
        loss, z, h = forward(self, *a, parts=True)
        return (loss + float("inf") if len(calls) > 4 else loss), z, h
    IJEPA.forward = inf_loss
    try:
        for prec in ("fp32", "bf16"):
            calls.clear()
            out = train(make_cfg(os.path.join(work, f"inf{prec}"), prec, extra=("data.batch_size=8",)), zero_stage=2)
            res[f"zero2_{prec}_infinite_loss"] = summary(out)
    finally:
        IJEPA.forward = forward
    return res


# ============================================================================ keys
def run_keys(work):
    """The keys x backends table (tests/backend_table.py) under ZeRO-2 and ZeRO-3."""
    import torch.distributed as dist
    from backend_table import BASE, jpeg_folder, run_table
    from engine.train import train
    if dist.get_rank() == 0:
        jpeg_folder(os.path.join(work, "jpegs"))
    barrier()

    def make(folder, overrides):
        return IJEPAConfig.from_yaml(SMOKE, [f"logging.folder={folder}", *BASE, *overrides])
    res = {}
    for stage in (2, 3):
        res[f"zero{stage}"] = run_table(lambda cfg: train(cfg, zero_stage=stage), make, f"zero{stage}",
                                        os.path.join(work, f"keys{stage}"), jpegs=os.path.join(work, "jpegs"))
    return res


MODES = {"keys": run_keys, "nonfinite": run_nonfinite, "equiv": run_equiv, "cross": run_cross, "loop": run_loop, "syncs": run_syncs}


if __name__ == "__main__":
    import torch.distributed as dist
    from engine.distributed import init_distributed
    modes, out, work = sys.argv[1:4]
    init_distributed(make_cfg(os.path.join(work, "probe")))
    results = {}
    for mode in modes.split(","):    # several modes share one launch (imports cost ~10 s per launch)
        t = time.time()
        results[mode] = MODES[mode](work)
        results[mode + "_seconds"] = time.time() - t
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
