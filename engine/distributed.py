"""Where this process runs: rank, world size, device, and the process group.

Ranks come from torchrun or the deepspeed launcher (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), else from SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``; the master is the first host of the job's node list), else a single process.
CPU ranks talk over gloo, GPU ranks over NCCL with one GPU each (``cuda:LOCAL_RANK``). Every
collective times out after ``IJEPA_DIST_TIMEOUT_S`` seconds (default 1800), so a rank that dies
or hangs ends the others with one line instead of blocking them forever.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

import torch

from engine.errors import ConfigError

DEFAULT_TIMEOUT_S = 1800          # DeepSpeed's own default process-group timeout

# ============================================================================ launch environment
@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str            # torchrun | deepspeed | slurm | single


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM host list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launch_env(environ=None) -> LaunchEnv:
    """Rank/world/master from torchrun or the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), else from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    master = first host of the job's node list), else a single process."""
    env = os.environ if environ is None else environ

    def as_int(key):
        try:
            return int(env[key])
        except ValueError:
            raise ConfigError(f"environment: {key}={env[key]!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        rank, world = as_int("RANK"), as_int("WORLD_SIZE")
        local = as_int("LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = as_int("MASTER_PORT") if "MASTER_PORT" in env else 29500
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = as_int("SLURM_PROCID"), as_int("SLURM_NTASKS")
        local = as_int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = as_int("MASTER_PORT")
        else:   # one port per job, so two jobs sharing a node do not collide
            port = 20000 + (int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    else:
        launcher, rank, world, local = "single", 0, 1, 0
        addr, port = "127.0.0.1", int(env.get("MASTER_PORT") or _free_port())
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"environment: rank {rank} / world size {world} is not a valid rank assignment")
    return LaunchEnv(rank, world, local, addr, port, launcher)


@dataclass
class DistState:
    env: LaunchEnv
    device: torch.device
    backend: str
    owns_pg: bool            # this call created the process group (and destroys it at the end)

    @property
    def rank(self):
        return self.env.rank

    @property
    def world_size(self):
        return self.env.world_size


def _import_deepspeed(device_type: str):
    if device_type == "cpu":
        # pick the CPU accelerator explicitly (auto-detection prints a warning per rank)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"DeepSpeed is not installed ({e}); pip install deepspeed==0.19.8") from None
    # The CPU accelerator JIT-compiles an inference-only shared-memory all-reduce op at
    # init_distributed (~2 minutes with g++); training collectives go through gloo. The table
    # is private but is the only switch that exists.
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:
        pass
    return deepspeed


def dist_timeout_s() -> float:
    raw = os.environ.get("IJEPA_DIST_TIMEOUT_S")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"IJEPA_DIST_TIMEOUT_S={raw!r} must be a number of seconds") from None
    if v <= 0:
        raise ConfigError(f"IJEPA_DIST_TIMEOUT_S={raw!r} must be > 0")
    return v


def init_distributed(cfg) -> DistState:
    """Set up the process group for torchrun / deepspeed / SLURM / a single process.

    CPU -> gloo, GPU -> nccl (one GPU per rank, ``cuda:LOCAL_RANK``). Every collective
    times out after ``IJEPA_DIST_TIMEOUT_S`` seconds (default 1800), so a rank that dies
    or hangs ends the others with an error instead of blocking them forever.
    """
    import torch.distributed as dist
    env = detect_launch_env()
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = want in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                              f"start one process per GPU")
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed = _import_deepspeed(device.type)
    timeout = dist_timeout_s()
    owns = not (dist.is_available() and dist.is_initialized())
    if owns:
        # DeepSpeed reads these; the SLURM and single-process paths have to provide them
        os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                           "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
                           "MASTER_PORT": str(env.master_port)})
        td = datetime.timedelta(seconds=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=td)
        # ZeRO's collectives run on DeepSpeed's clone of the world group, which it creates with
        # new_group() and torch's 30-minute default, not the timeout above: create the clone
        # first, with the timeout (measured: without this a hung peer blocks the others for 30 min)
        from deepspeed.utils import groups as ds_groups
        if getattr(ds_groups, "_WORLD_GROUP", "absent") is None:
            ds_groups._WORLD_GROUP = dist.new_group(ranks=list(range(env.world_size)), timeout=td)
    else:
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        env = LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.master_addr,
                        env.master_port, env.launcher)
        backend = dist.get_backend()
    return DistState(env, device, backend, owns)


def _test_fault(rank: int, step: int) -> None:
    """Failure injection for the tests only: IJEPA_TEST_FAULT=rank:step:exit|hang."""
    spec = os.environ.get("IJEPA_TEST_FAULT")
    if not spec:
        return
    r, s, mode = spec.split(":")
    if int(r) == rank and int(s) == step:
        print(f"ijepa: test fault: rank {rank} {mode}s at step {step}", file=sys.stderr, flush=True)
        if mode == "hang":
            while True:
                time.sleep(3600)
        os._exit(1)

