"""DeepSpeed ZeRO 0-3 on CPU: 2 ranks over gloo, launched with torch.distributed.run.

The heavy checks run in ONE torchrun launch (tests/ds_harness.py, ~1.5 min on 2 cores) whose
measurements the tests below assert on; the CLI, export and failure tests add three more.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from engine.cli import main as cli_main
from engine.config import ConfigError, IJEPAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
PY = sys.executable


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def _torchrun(args, timeout=600, **env):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _tail(p, n=3000):
    return (p.stdout + p.stderr)[-n:]


# ------------------------------------------------------------------ the torchrun harness
@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    work = tmp_path_factory.mktemp("ds")
    out = work / "out.json"
    t0 = time.time()
    p = _torchrun([os.path.join(ROOT, "tests", "ds_harness.py"), "equiv,cross,loop,keys,syncs,nonfinite", str(out),
                   str(work)], timeout=1200)
    assert p.returncode == 0, _tail(p)
    res = json.loads(out.read_text())
    res["launch_seconds"] = time.time() - t0
    return res


def _cases(res, precision):
    return [c for c in res["equiv"]["cases"] if c["precision"] == precision and not c["extra"]]


@pytest.mark.slow   # torchrun launches
def test_fp32_every_stage_matches_single_process_engine(harness):
    """ZeRO 0-3, 2 ranks, 5 steps (with grad accumulation 2 + clipping 0.5 on stages 1 and 3):
    same losses, target encoder and fp32 weights as the one-process strategy on the global batch."""
    cases = _cases(harness, "fp32")
    assert sorted(c["stage"] for c in cases) == [0, 1, 2, 3]
    for c in cases:
        assert len(c["losses"]) == 5
        assert c["loss_diff"] < 1e-5, c
        assert c["target_diff"] < 1e-5, c
        assert c["target_moved"] > 1e-4, c          # the comparison above is not vacuous
        assert c["student_diff"] < 1e-5, c
        assert c["losses"][-1] < c["losses"][0]


@pytest.mark.slow   # torchrun launches
def test_batch_normalised_targets_use_the_global_batch(harness):
    """loss.target_norm=batch under ZeRO-2 on 2 ranks equals the single process on the global
    batch: the batch statistics are all-reduced, so the targets do not depend on the rank count."""
    [c] = [c for c in harness["equiv"]["cases"] if c["extra"] == ["loss.target_norm=batch"]]
    assert c["loss_diff"] < 1e-5 and c["target_diff"] < 1e-5 and c["student_diff"] < 1e-5, c
    assert c["target_moved"] > 1e-4, c


@pytest.mark.slow   # torchrun launches
def test_bf16_every_stage_close_to_single_process_engine(harness):
    """bf16 module weights and bf16 gradient reduction vs the single-process bf16 autocast engine
    (fp32 weights). Measured ~2e-4 on every stage; the bound is 2e-3, tight enough to catch
    DeepSpeed's ZeRO-0 bf16 start-up optimizer step, which gave 4.7e-3."""
    cases = _cases(harness, "bf16")
    assert sorted(c["stage"] for c in cases) == [0, 1, 2, 3]
    for c in cases:
        assert c["loss_diff"] < 2e-3, c
        assert c["target_diff"] < 2e-3, c


@pytest.mark.slow   # torchrun launches
def test_checkpoint_reload_replays_steps_bit_for_bit(harness):
    """Save after step 3, reload into a fresh strategy: steps 3-4 give identical losses, weights and target."""
    for c in harness["equiv"]["cases"]:
        assert c["resumed"] == c["losses"][3:], c
        assert c["resume_target_diff"] == 0.0 and c["resume_student_diff"] == 0.0, c


@pytest.mark.slow   # torchrun launches
def test_export_continues_in_single_process_engine(harness):
    """The step-3 checkpoint exported to one engine file: fp32 weights and target equal the sharded
    checkpoint exactly, and the one-process strategy continues with the same losses (the Adam
    moments and step count were carried over)."""
    for c in harness["equiv"]["cases"]:
        assert c["export_step"] == 3
        assert c["export_weight_diff"] == 0.0, c
        assert c["export_target_diff"] == 0.0, c
        tol = 1e-5 if c["precision"] == "fp32" else 1e-2
        assert c["export_loss_diff"] < tol, c


@pytest.mark.slow   # torchrun launches
def test_zero3_bf16_target_moves_every_step(harness):
    """m = 0.996 -> 1, bf16, ZeRO-3: the fp32 target shard changes every step and equals a dense
    fp32 EMA of the fp32 masters; the bf16 shard is exactly its rounding. Control: a bf16 EMA
    updated in place from the same weights gets a large share of the weight-matrix entries wrong,
    many of them stuck at their initial value (measured: ~40 % wrong, ~18 % stuck)."""
    mv = harness["equiv"]["moves"]
    assert mv["momenta"][0] == pytest.approx(0.996)
    assert all(f > 0.99 for f in mv["changed_fraction_per_step"]), mv
    assert mv["dense_diff"] < 1e-6, mv
    assert mv["bf16_shard_mismatch"] == 0, mv
    assert mv["bf16_moved_fraction"] > 0.1, mv        # the exact EMA is visible even in bf16
    assert mv["naive_bf16_wrong_fraction"] > 0.2, mv
    assert mv["naive_bf16_stuck_fraction"] > 0.05, mv


@pytest.mark.slow   # torchrun launches
@pytest.mark.parametrize("move", ["zero2_to_local", "local_to_zero3", "zero3_to_zero1"])
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-6), ("bf16", 2e-3)])
def test_checkpoints_move_between_backends_and_rank_counts(harness, move, precision, tol):
    """3 steps under one backend, checkpoint, 2 more under another (2 ranks ZeRO-2 -> 1 process;
    1 process -> 2 ranks ZeRO-3; ZeRO-3 -> ZeRO-1), on the same batches as an uninterrupted
    one-process run: the losses continue within fp32 (bf16) rounding, so weights, Adam moments and
    step count, and the EMA target all carried over."""
    r = harness["cross"][f"{move}_{precision}"]
    assert len(r["split"]) == len(r["straight"]) == 5
    assert max(abs(a - b) for a, b in zip(r["split"], r["straight"])) < tol, r
    assert r["split"][-1] < r["split"][0]
    if "adam_step" in r:
        assert r["adam_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["2", "3"])
def test_training_loop_resume_is_exact(harness, stage):
    """engine.train.train straight (8 steps) vs stopped at step 3 and resumed with --resume."""
    r = harness["loop"][stage]
    assert r["steps"] == [8, 3, 8] and r["stop"] == ["finished", "max_steps"]
    assert r["first"] + r["second"] == r["straight"]      # bitwise-equal floats
    assert r["target_equal"]
    # every_steps=2, keep_last=1: the latest tag plus one older step tag survive
    assert r["latest"] == "step00000008"
    assert [t for t in r["tags"] if t.startswith("step")] == ["step00000006", "step00000008"]


@pytest.mark.slow
def test_training_loop_resumes_under_another_zero_stage(harness):
    """ZeRO-3 for 3 steps, --resume under ZeRO-1 for the rest: the same losses as ZeRO-3 throughout
    (same ranks, so the same data order; both keep fp32 masters and moments)."""
    r = harness["loop"]["3to1"]
    assert r["steps"] == [3, 8]
    assert max(abs(a - b) for a, b in zip(r["split"], r["straight"])) < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_every_key_means_the_same_under_zero(harness, stage):
    """tests/backend_table.py under DeepSpeed: each key honoured (what the loop built, its log, its
    losses against the same backend's defaults) or refused in one line before any work."""
    from engine.strategy import UNSUPPORTED
    from backend_table import TABLE
    results = harness["keys"][stage]
    refused = {key for key, _, where in UNSUPPORTED if where == stage}
    assert {k: v.split(":")[0] for k, v in results.items()} == \
        {key: "refused" if key in refused else "ok" for key, *_ in TABLE}, results
    for key in refused:
        assert "\n" not in results[key] and key in results[key]


@pytest.mark.slow
def test_a_default_zero2_window_reads_nothing_back(harness):
    """ZeRO-2 bf16 on 2 ranks, counted per rank (tests/sync_audit.py): no host read in the steps
    outside the window reads and checkpoints, on ZeRO 1 and 2 with bf16. Where DeepSpeed itself reads
    the gradient norm back each step (fp32, clipping, ZeRO-3; ZeRO-0 bf16's unfused wrapper), the
    reads are DeepSpeed's own, none the engine's."""
    r = harness["syncs"]
    for name in ("zero2_bf16", "zero1_bf16"):
        assert r[name]["per_rank"] == [[], []], r[name]
    for name in ("zero2_fp32", "zero2_bf16_clip", "zero3_bf16", "zero0_bf16"):
        reads = [w for rank in r[name]["per_rank"] for w in rank]
        assert reads and all("deepspeed" in w or "stage" in w or "utils.py" in w or "optimizer.py" in w
                             for w in reads), reads
        assert not any(w.split(" <- ")[0].split("] ")[-1].startswith(("train.py", "zero.py", "strategy.py",
                                                                         "model.py")) for w in reads), reads


@pytest.mark.slow
def test_every_stage_skips_a_nonfinite_step(harness):
    """NaN images for the second epoch (4 steps): under ZeRO 0-3, fp32 and bf16, every one of its
    steps is skipped -- the Adam step count stays at the first epoch's 4 -- and the run finishes.
    The same for an infinite loss whose gradients are finite (ZeRO-2)."""
    assert len(harness["nonfinite"]) == 10
    for name, r in harness["nonfinite"].items():
        assert r == {"skipped": 4, "steps": 8, "adam_step": 4, "nonfinite_losses": 4}, (name, r)


# ------------------------------------------------------------------ CLI + export round trip
@pytest.mark.slow   # torchrun launches
def test_cli_zero3_train_then_export_then_resume_in_one_process(tmp_path):
    from engine.checkpoint import Snapshot, load_file
    from engine.model import build_model
    run = tmp_path / "run"
    p = _torchrun(["-m", "engine.cli", "train", "--config", SMOKE, "--zero", "3", "--quiet",
                   "--override", f"logging.folder={run}", "--override", "train.max_steps=5",
                   "--override", "train.precision=bf16"], timeout=300)
    assert p.returncode == 0, _tail(p)
    assert "trained 5 steps (max_steps)" in p.stderr
    ckdir = run / "jepa-sharded"
    assert (ckdir / "latest").read_text() == "step00000005"
    assert sorted(os.listdir(ckdir / "step00000005")) == ["rank00000.pt", "rank00001.pt"]
    rows = (run / "jepa_r0.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("epoch,itr,loss")

    cfg = IJEPAConfig.from_yaml(SMOKE, [f"logging.folder={run}"])
    ref_file = tmp_path / "ref.pth.tar"
    assert cli_main(["export", "--checkpoint", str(ckdir), "--output", str(ref_file)]) == 0
    ref = load_file(str(ref_file))
    assert "engine" not in ref and ref["epoch"] == 1 and ref["world_size"] == 2
    assert all(k.startswith("module.") for k in ref["encoder"])
    model = build_model(cfg)
    model.load_reference_state_dict(ref)                  # strict
    drift = max(float((t - e).detach().abs().max()) for t, e in zip(model.target_encoder.parameters(),
                                                            model.encoder.parameters()))
    assert drift > 0                                      # the target is its own EMA, not a copy
    assert len(ref["opt"]["param_groups"]) == 4 and ref["opt"]["param_groups"][2]["WD_exclude"]
    assert len(ref["opt"]["state"]) > 0

    # the same run continues in ONE process from the sharded checkpoint. 2 ranks x 8 images had done
    # 4 steps of epoch 1 and 1 of epoch 2 (16 of its images); one process at 8 images has 8 steps
    # per epoch, so epoch 2 continues after 2 steps: step 8 + 2 = 10, then 2 more
    p = subprocess.run([PY, "-m", "engine.cli", "train", "--config", SMOKE, "--resume", "--quiet",
                        "--override", f"logging.folder={run}", "--override", "train.max_steps=12",
                        "--override", "train.precision=bf16"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, _tail(p)
    assert "resuming a run of 2 rank(s) x batch 8 x accumulation 1 on 1 x 8 x 1" in p.stderr
    assert "after 16 of its samples, at step 10" in p.stderr and "trained 12 steps" in p.stderr
    snap = Snapshot(str(run / "jepa-latest.pth.tar"))
    assert snap.meta["step"] == 12 and snap.meta["world_size"] == 1 and snap.meta["adam_step"] == 7


def test_export_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert cli_main(["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]
    (tmp_path / "ck").mkdir()
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "x")]) == 2
    assert "'latest' file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_rejects_bad_deepspeed_section_before_connecting(tmp_path, capsys):
    base = ["train", "--config", SMOKE, "--zero", "2", "--override", f"logging.folder={tmp_path}"]
    assert cli_main(base + ["--override", "deepspeed.optimizer.type=Adam"]) == 2
    assert "deepspeed.optimizer: not accepted" in capsys.readouterr().err
    assert cli_main(base + ["--override", "deepspeed.gradient_accumulation_steps=4"]) == 2
    assert "optimization.grad_accum_steps" in capsys.readouterr().err


# ------------------------------------------------------------------ a rank that dies or hangs
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # torchrun launches
def test_dead_or_hung_rank_ends_the_run_with_a_clear_error(tmp_path):
    """Two runs started like SLURM tasks (no torchrun to kill the survivors): in one, rank 1
    exits at step 2; in the other it hangs there. Rank 0 must stop with exit code 1 and a
    one-line message soon after (gloo reports the dead peer at once; the hung one is caught by
    the process-group timeout, 8 s here), instead of waiting forever."""
    procs = {}
    for mode in ("exit", "hang"):
        port = _free_port()
        for r in (0, 1):
            env = _env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_NODELIST="localhost",
                       MASTER_PORT=str(port), IJEPA_DIST_TIMEOUT_S="8", IJEPA_TEST_FAULT=f"1:2:{mode}")
            log = open(tmp_path / f"{mode}{r}.log", "w")
            procs[mode, r] = (subprocess.Popen(
                [PY, "-m", "engine.cli", "train", "--config", SMOKE, "--zero", "2", "--quiet",
                 "--override", f"logging.folder={tmp_path / mode}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    t0, fault_at, end_at = time.time(), {}, {}
    try:
        while len(end_at) < 2 and time.time() - t0 < 240:
            for mode in ("exit", "hang"):
                if mode not in fault_at and "test fault: rank 1" in (tmp_path / f"{mode}1.log").read_text():
                    fault_at[mode] = time.time()
                if mode not in end_at and procs[mode, 0][0].poll() is not None:
                    end_at[mode] = time.time()
            time.sleep(0.2)
    finally:
        for p, log in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    for mode in ("exit", "hang"):
        out = (tmp_path / f"{mode}0.log").read_text()
        assert mode in end_at, f"rank 0 still running 240 s after launch ({mode})\n{out[-2000:]}"
        assert procs[mode, 0][0].returncode == 1, out[-2000:]
        assert "a collective failed, so another rank died or hung" in out
        assert mode in fault_at
        assert end_at[mode] - fault_at[mode] < 45, (mode, end_at[mode] - fault_at[mode])
        assert "Traceback" not in out
    assert "Timed out" in (tmp_path / "hang0.log").read_text()


# ------------------------------------------------------------------ pure functions
def test_launch_env_detection():
    from engine.distributed import detect_launch_env, first_slurm_host
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("node7,node8") == "node7"
    assert first_slurm_host("a[1-2]-ib") == "a1-ib"
    e = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
                           "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "h0", 1234,
                                                                                              "torchrun")
    e = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "dgx[12-13]", "SLURM_JOB_ID": "123456"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 1, "dgx12", "slurm")
    assert e.master_port == 20000 + 123456 % 20000
    e = detect_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
    with pytest.raises(ConfigError, match="not a valid rank"):
        detect_launch_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_deepspeed_config_merge(tmp_path):
    from engine.zero import build_ds_config
    cfg = IJEPAConfig.from_yaml(SMOKE, ["optimization.grad_accum_steps=2", "train.precision=bf16"])
    cfg.deepspeed = {"zero_optimization": {"stage": 1, "overlap_comm": True}, "gradient_clipping": "auto",
                     "communication_data_type": "fp32"}
    d = build_ds_config(cfg, 3, world_size=4)
    assert d["train_micro_batch_size_per_gpu"] == 8 and d["gradient_accumulation_steps"] == 2
    assert d["train_batch_size"] == 64
    assert d["gradient_clipping"] == 0.0                 # explicit: DeepSpeed would default to 1.0
    assert d["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    # bf16: DeepSpeed's per-step overflow read is off, the engine skips non-finite steps on the device
    assert d["bf16"] == {"enabled": True, "check_grad_overflow": False} and d["communication_data_type"] == "fp32"
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 1.0}))
    cfg = IJEPAConfig.from_yaml(SMOKE, ["optimization.clip_grad=1.0"])
    cfg.deepspeed = {"config_file": str(js), "zero_optimization": {"contiguous_gradients": False}}
    d = build_ds_config(cfg, 2, world_size=2)
    assert d["zero_optimization"] == {"reduce_bucket_size": 1000, "contiguous_gradients": False, "stage": 2}
    assert d["bf16"] == {"enabled": False}
    for bad, msg in (({"optimizer": {"type": "Adam"}}, "not accepted"),
                     ({"train_micro_batch_size_per_gpu": 3}, "data.batch_size"),
                     ({"fp16": {"enabled": True}}, "fp16"),
                     ({"bf16": {"enabled": True}}, "precision"),
                     ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload"),
                     ({"config_file": str(tmp_path / "missing.json")}, "not a file")):
        cfg.deepspeed = bad
        with pytest.raises(ConfigError, match=msg):
            build_ds_config(cfg, 2, world_size=2)


def test_zero_memory_table_vith14():
    from engine.zero import count_params, format_memory_table, zero_memory_table
    cfg = IJEPAConfig.from_yaml(os.path.join(ROOT, "configs", "in1k_vith14_ep300.yaml"),
                                ["data.root_path=.", "logging.folder=runs/x"], validate=False)
    n = count_params(cfg)
    assert 630e6 < n["encoder"] < 633e6 and 20e6 < n["predictor"] < 25e6
    rows = zero_memory_table(cfg, 16)
    totals = [r["total"] for r in rows]
    assert totals == sorted(totals, reverse=True)
    gib, P, T = 1024 ** 3, n["trainable"], n["target"]
    assert rows[0]["total"] == pytest.approx((16 * P + 6 * T) / gib)       # DDP-like: 16 bytes/param + target
    assert rows[3]["total"] == pytest.approx((16 * P + 6 * T) / 16 / gib)  # everything partitioned
    assert "| 3 | 16 |" in format_memory_table(rows)


def test_snapshot_detects_a_missing_rank_file(tmp_path):
    """A sharded checkpoint whose rank files do not tile a tensor is refused, naming the tensor."""
    from engine.checkpoint import SHARD_FORMAT, Snapshot, save_atomic
    from engine.errors import CheckpointError
    base = {"format": SHARD_FORMAT, "world_size": 2, "strategy": "zero3", "precision": "fp32", "config": {},
            "adam_step": 0, "param_names": [], "param_hparams": [], "progress": {"step": 1},
            "shapes": {"weights": {"encoder.w": (2, 3)}, "target": {}}}
    frag = lambda a, k: {"weights": {"fragments": [("encoder.w", a, k)], "data": torch.arange(a, a + k, dtype=torch.float32)},  # noqa: E731
                         "exp_avg": {"fragments": [], "data": torch.zeros(0)}}
    save_atomic({**base, "rank": 0, "tensors": frag(0, 4)}, str(tmp_path / "rank00000.pt"))
    save_atomic({**base, "rank": 1, "tensors": frag(4, 2)}, str(tmp_path / "rank00001.pt"))
    assert torch.equal(Snapshot(str(tmp_path)).tensor("weights", "encoder.w"), torch.arange(6.).view(2, 3))
    save_atomic({**base, "rank": 1, "tensors": frag(4, 1)}, str(tmp_path / "rank00001.pt"))
    with pytest.raises(CheckpointError, match="encoder.w.*5 of 6"):
        Snapshot(str(tmp_path)).tensor("weights", "encoder.w")
    os.unlink(tmp_path / "rank00001.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        Snapshot(str(tmp_path))
