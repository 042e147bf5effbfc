"""Runs under ``torch.distributed.run --nproc_per_node 2`` for tests/test_distributed.py.

``python -m torch.distributed.run ... tests/ds_harness.py MODE OUT.json WORKDIR``

equiv  For each (stage, precision, accumulation, clipping) case: the single-process engine
       (``engine.train.train_step`` on the concatenated global batch, same init, same masks)
       vs the ZeRO run for 5 steps (losses, target encoder, fp32 weights); a checkpoint at
       step 3 reloaded into a fresh engine must replay steps 3-4 bit for bit; the same
       checkpoint exported to the engine format and loaded into the single-process engine
       must continue with the same losses. Plus the ZeRO-3 bf16 "target moves" check.
loop   ``train_deepspeed`` straight vs stopped at step 3 and resumed (ZeRO-2 and ZeRO-3).
Rank 0 writes the measurements to OUT.json; the pytest side asserts on them.
"""
import json
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


def reference_run(cfg, accum, world, model=None, optimizer=None, steps=range(STEPS)):
    from engine.model import build_model
    from engine.train import build_optimizer, train_step
    dev = torch.device("cpu")
    if model is None:
        model = build_model(cfg)
        optimizer = build_optimizer(model, cfg, dev)
    masks, sched = all_masks(cfg, accum), schedules(cfg)
    losses = []
    for step in steps:
        micro = [global_batch(step, m, masks, world) for m in range(accum)]
        loss, _ = train_step(model, optimizer, micro, lr=sched.lr(step), wd=sched.wd(step),
                             momentum=sched.momentum(step), precision=cfg.precision, device=dev,
                             clip_grad=cfg.optimization.clip_grad)
        losses.append(float(loss))
    return losses, model


def maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def student_of(model):
    return {**{"encoder." + n: p.detach().clone() for n, p in model.encoder.named_parameters() if p.requires_grad},
            **{"predictor." + n: p.detach().clone() for n, p in model.predictor.named_parameters() if p.requires_grad}}


def run_equiv(work):
    import torch.distributed as dist
    from engine.checkpoint import load_file, restore
    from engine.distributed import ZeroTrainer, export_checkpoint, init_distributed
    from engine.model import build_model
    from engine.train import build_optimizer
    cases = [  # (stage, precision, accum, clip, extra overrides)
        (0, "fp32", 1, None, ()), (1, "fp32", 2, 0.5, ()), (2, "fp32", 1, None, ()), (3, "fp32", 2, 0.5, ()),
        (0, "bf16", 1, None, ()), (1, "bf16", 1, None, ()), (2, "bf16", 2, 0.5, ()), (3, "bf16", 1, None, ()),
        # targets normalised over the batch: the statistics must be the global batch's, not a rank's
        (2, "fp32", 1, None, ("loss.target_norm=batch",)),
    ]
    probe = make_cfg(os.path.join(work, "probe"))
    dstate = init_distributed(probe)
    rank, world = dstate.rank, dstate.world_size
    results = {"cases": [], "timing": {}}
    t0 = time.time()
    # single-process references first: a ZeRO-3 engine swaps torch's F.linear for its own
    # wrapper for the rest of the process
    refs = {}
    if rank == 0:
        for case in cases:
            stage, prec, accum, clip, extra = case
            cfg = make_cfg(os.path.join(work, f"ref{stage}{prec}{len(extra)}"), prec, accum, clip, extra=extra)
            losses, model = reference_run(cfg, accum, world)
            refs[case] = (losses, {n: p.detach().clone() for n, p in model.target_encoder.named_parameters()},
                          student_of(model))
    results["timing"]["reference_s"] = time.time() - t0
    for case in cases:
        stage, prec, accum, clip, extra = case
        tc = time.time()
        tag = f"{stage}{prec}{len(extra)}"
        cfg = make_cfg(os.path.join(work, f"z{tag}"), prec, accum, clip, extra=extra)
        masks, sched = all_masks(cfg, accum), schedules(cfg)
        ckdir = os.path.join(work, f"ck{tag}")
        init_target = {n: p.detach().clone() for n, p in build_model(cfg).target_encoder.named_parameters()}

        def step_batches(step):
            return [(images(step, m, rank), *masks[step][m]) for m in range(accum)]

        def kw(step):
            return dict(lr=sched.lr(step), wd=sched.wd(step), momentum=sched.momentum(step))

        tr = ZeroTrainer(cfg, stage, dstate)
        losses = []
        for step in range(STEPS):
            loss, _ = tr.train_step(step_batches(step), **kw(step))
            losses.append(loss)
            if step + 1 == SAVE_AT:
                at_save = (tr.full_target(), tr.full_student_fp32())
                tr.save(ckdir, "s3", {"step": SAVE_AT, "epoch": 0, "batch_in_epoch": SAVE_AT * accum,
                                      "loss": loss, "sampler": None, "rng_cpu": torch.get_rng_state()})
        target, student = tr.full_target(), tr.full_student_fp32()
        del tr
        tr2 = ZeroTrainer(cfg, stage, dstate)
        tr2.load(ckdir, "s3")
        resumed = [tr2.train_step(step_batches(s), **kw(s))[0] for s in range(SAVE_AT, STEPS)]
        resumed_target = tr2.full_target()
        del tr2
        rec = {"stage": stage, "precision": prec, "accum": accum, "clip": clip, "extra": list(extra),
               "losses": losses, "resumed": resumed,
               "resume_target_diff": maxdiff(target, resumed_target)}
        if rank == 0:
            ref_losses, ref_target, ref_student = refs[case]
            rec.update(ref_losses=ref_losses,
                       loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
                       target_diff=maxdiff(target, ref_target),
                       target_moved=maxdiff(target, init_target),
                       student_diff=maxdiff(student, ref_student))
            out = os.path.join(work, f"export{tag}.pth.tar")
            export_checkpoint(ckdir, out, tag="s3", fmt="engine")
            ck = load_file(out)
            model = build_model(cfg)
            opt = build_optimizer(model, cfg, torch.device("cpu"))
            eng = restore(ck, model, opt, None)
            rec["export_step"] = eng["step"]
            rec["export_weight_diff"] = maxdiff(student_of(model), at_save[1])
            rec["export_target_diff"] = maxdiff({n: p for n, p in model.target_encoder.named_parameters()}, at_save[0])
            exp_losses, _ = reference_run(cfg, accum, world, model, opt, steps=range(SAVE_AT, STEPS))
            rec["export_losses"] = exp_losses
            rec["export_loss_diff"] = max(abs(a - b) for a, b in zip(exp_losses, losses[SAVE_AT:]))
        rec["seconds"] = time.time() - tc
        results["cases"].append(rec)
        dist.barrier()
    results["moves"] = target_moves(work, dstate)
    results["timing"]["total_s"] = time.time() - t0
    return results


def target_moves(work, dstate):
    """ZeRO-3, bf16, the reference's momentum schedule (0.996 -> 1): the fp32 target shard must
    change every step and equal a dense fp32 EMA of the fp32 master weights; the bf16 shard must
    be its rounding; a naive in-place bf16 EMA of the same weights would have frozen."""
    import deepspeed
    from engine.distributed import ZeroTrainer
    from engine.model import build_model
    cfg = make_cfg(os.path.join(work, "moves"), "bf16", ema=(0.996, 1.0))
    masks, sched = all_masks(cfg, 1), schedules(cfg)
    init = {n: p.detach().clone() for n, p in build_model(cfg).target_encoder.named_parameters()}
    tr = ZeroTrainer(cfg, 3, dstate)
    trainable = {n for n, p in tr.engine.module.encoder.named_parameters() if p.requires_grad}
    dense = {n: v.clone() for n, v in init.items()}
    naive = {n: v.bfloat16() for n, v in init.items()}
    prev = {n: v.clone() for n, v in init.items()}
    changed, dense_diff, bf16_mismatch = [], 0.0, 0
    for step in range(STEPS):
        m = sched.momentum(step)
        tr.train_step([(images(step, 0, dstate.rank), *masks[step][0])], lr=sched.lr(step), wd=sched.wd(step),
                      momentum=m)
        shadow = tr.full_target()
        master = tr.full_student_fp32()
        for n in dense:
            src = master["encoder." + n] if n in trainable else init[n]
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
    # a bf16 target updated in place, against the bf16 rounding of the exact (fp32) EMA
    naive_wrong = sum(int((naive[n] != dense[n].bfloat16()).sum()) for n in mats) / tot
    moved = {n: dense[n].bfloat16() != init[n].bfloat16() for n in mats}
    n_moved = sum(int(v.sum()) for v in moved.values())
    naive_stuck = sum(int(((naive[n] == init[n].bfloat16()) & moved[n]).sum()) for n in mats) / max(1, n_moved)
    return {"changed_fraction_per_step": changed, "dense_diff": dense_diff, "bf16_shard_mismatch": bf16_mismatch,
            "naive_bf16_wrong_fraction": naive_wrong,
            "naive_bf16_stuck_fraction": naive_stuck, "bf16_moved_fraction": n_moved / tot, "momenta": [sched.momentum(s) for s in range(STEPS)]}


def run_loop(work):
    from engine.distributed import init_distributed, train_deepspeed
    probe = make_cfg(os.path.join(work, "probe"))
    dstate = init_distributed(probe)
    res = {}
    for stage, prec in ((2, "bf16"), (3, "bf16")):
        extra = ("checkpoint.every_steps=2", "checkpoint.keep_last=1", "data.batch_size=8")

        def cfg(name, *more):
            return make_cfg(os.path.join(work, f"{name}{stage}"), prec, ema=(0.996, 1.0), extra=extra + more)
        a = train_deepspeed(cfg("straight"), stage, hard_exit=False)
        b1 = train_deepspeed(cfg("split", "train.max_steps=3"), stage, hard_exit=False)
        b2 = train_deepspeed(cfg("split"), stage, resume=True, hard_exit=False)
        ta, tb = a["trainer"].full_target(), b2["trainer"].full_target()
        ckdir = a["checkpoint_dir"]
        res[str(stage)] = {
            "straight": a["losses"], "first": b1["losses"], "second": b2["losses"],
            "steps": [a["steps"], b1["steps"], b2["steps"]], "stop": [a["stop_reason"], b1["stop_reason"]],
            "target_equal": all(torch.equal(ta[n], tb[n]) for n in ta),
            "tags": sorted(os.listdir(ckdir)), "latest": open(os.path.join(ckdir, "latest")).read(),
        }
        del a, b1, b2
    return res


if __name__ == "__main__":
    import torch.distributed as dist
    modes, out, work = sys.argv[1:4]
    results = {}
    for mode in modes.split(","):    # several modes share one launch (imports cost ~10 s per launch)
        t = time.time()
        results[mode] = {"equiv": run_equiv, "loop": run_loop}[mode](work)
        results[mode + "_seconds"] = time.time() - t
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
