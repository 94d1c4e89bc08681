"""Several processes (torchrun): the launch's variables, one device per rank, the process group.
DistributedDataParallel as in PyTorch's DDP tutorial and torchvision's classification reference; the loop
itself (train.py) only all-reduces its sums and broadcasts BatchNorm statistics."""
from __future__ import annotations

import datetime
import os
import random
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

import ghost_ext
from common import UsageError, pick_device
from config import Config
from learner import autocast, precision

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(name: str) -> torch.device:
    try:
        return pick_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def distributed_env() -> dict | None:
    """torchrun's rendezvous variables as {"rank", "world_size", "local_rank"}, or None when not launched by
    torchrun (none of RANK / WORLD_SIZE / LOCAL_RANK set). A partial or inconsistent set is a UsageError."""
    if not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    missing = [k for k in TORCHRUN_VARS if not os.environ.get(k)]
    if missing:
        raise UsageError(f"distributed launch without {', '.join(missing)} in the environment; start several "
                         f"processes with `torchrun --nproc_per_node N train.py ...`, which sets {', '.join(TORCHRUN_VARS)}")
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    if world < 1 or not 0 <= rank < world or local < 0 or local > rank:
        raise UsageError(f"inconsistent launch: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}; "
                         f"launch every process with the same torchrun command (--nnodes, --nproc_per_node)")
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world is not None and local_world.isdigit() and not local < int(local_world) <= world:
        raise UsageError(f"inconsistent launch: LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world} "
                         f"WORLD_SIZE={world}; launch every process with the same torchrun command")
    return {"rank": rank, "world_size": world, "local_rank": local}


def distributed_device(name: str, local_rank: int) -> torch.device:
    """One device per rank: cuda:LOCAL_RANK when CUDA is used, else the CPU."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if name not in ("auto", "cuda"):
        raise UsageError(f"--device {name} under torchrun: every rank uses cuda:LOCAL_RANK; pass --device cuda "
                         f"(or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UsageError(f"LOCAL_RANK {local_rank} but only {n} CUDA device(s) visible on this machine; "
                         f"use torchrun --nproc_per_node {n} (or fewer)")
    return torch.device("cuda", local_rank)


def restart_safe_store(env: dict, timeout: datetime.timedelta) -> dict:
    """init_process_group's store arguments. Under torchrun the agent's store outlives a restart, and the
    ranks' addresses from the attempt before are still in it: a rank that arrives first in the restarted
    group read its late peer's old address and failed with "Connection refused" (seen with --max-restarts).
    Each attempt therefore gets its own key prefix. Outside torchrun: {}, i.e. the usual env:// set-up."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env["world_size"],
                                is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"ghostcars/attempt_{attempt}", agent_store),
            "rank": env["rank"], "world_size": env["world_size"]}


def init_distributed(env: dict, device: torch.device, timeout_s: float) -> str:
    """nccl on CUDA, gloo on the CPU. Returns the backend's name. timeout_s bounds the set-up and every
    collective: a rank that waits longer for a dead peer fails, so torchrun can restart the group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout,
                                **restart_safe_store(env, timeout))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"torch.distributed ({backend}) did not start: {first}; check MASTER_ADDR/MASTER_PORT "
                         f"and that every process was launched with the same WORLD_SIZE") from None
    if dist.get_world_size() != env["world_size"]:
        raise UsageError(f"WORLD_SIZE={env['world_size']} but the process group has {dist.get_world_size()} "
                         f"ranks; launch every process with the same torchrun command")
    return backend


@dataclass
class Setup:
    """Where and how the steps run: one process or torchrun's several, the device, the precision."""
    rank: int
    world: int
    local_rank: int
    ddp: bool
    device: torch.device
    backend: str | None
    ghost_op: str  # the GhostModules' implementation (torch under --sync-bn with several processes)
    amp_dtype: torch.dtype | None  # None: no autocast
    scaler: torch.amp.GradScaler | None

    @property
    def is_main(self) -> bool:  # only rank 0 writes the run folder, logs and progress bars
        return self.rank == 0

    def autocast(self):
        return autocast(self.device, self.amp_dtype)


def set_up(cfg: Config) -> Setup:
    """Processes (torchrun or one), device, threads, determinism, seeds and precision."""
    t, r = cfg.train, cfg.run
    denv = distributed_env()
    ddp = denv is not None
    rank, world, local_rank = (denv["rank"], denv["world_size"], denv["local_rank"]) if ddp else (0, 1, 0)
    device = distributed_device(r.device, local_rank) if ddp else resolve_device(r.device)
    if t.sync_bn and ddp and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop --sync-bn for CPU (gloo) runs")
    backend = init_distributed(denv, device, t.dist_timeout) if ddp else None
    if ddp and rank != 0:
        sys.stdout = open(os.devnull, "w")  # main() restores it; errors still reach stderr
        warnings.filterwarnings("ignore")  # one copy of each warning (rank 0's) is enough
    if t.sync_bn and not ddp:
        print("note: --sync-bn only matters under torchrun (several processes); ignored", file=sys.stderr)
    ghost_op = cfg.model.ghost_op
    if t.sync_bn and ddp and cfg.model.arch.startswith("ghostnet"):
        # the fused op normalises the cheap branch with this rank's statistics only; the plain path runs the
        # GhostModules' BNs as (Sync)BatchNorm modules (model.convert_sync_batchnorm), so every BN is synchronised
        if ghost_op != "torch" and rank == 0:
            print(f"warning: --sync-bn: the fused ghost_ext op uses per-rank BatchNorm statistics, so the "
                  f"GhostModules run the plain PyTorch path (--ghost-op torch instead of {ghost_op}) with "
                  f"SyncBatchNorm", file=sys.stderr)
        ghost_op = "torch"
    if r.threads:
        torch.set_num_threads(r.threads)
    if cfg.model.arch.startswith("ghostnet"):
        try:
            ghost_ext.require_kernels(cfg.model.ghost_op, device)
        except RuntimeError as e:
            raise UsageError(str(e)) from None
    if r.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(r.seed)
    torch.manual_seed(r.seed)
    amp_dtype, scaler = precision(device, t.amp, t.amp_dtype)
    return Setup(rank, world, local_rank, ddp, device, backend, ghost_op, amp_dtype, scaler)
