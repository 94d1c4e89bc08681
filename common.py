"""The pieces every script shares, and nothing else: device choice, the machine's name, timing, atomic
writes. Imported by train, evaluate, predict, export, serve and the benchmarks; imports none of them.
(Checkpoint reading and its format live in model.py, with the model they hold.)"""
from __future__ import annotations

import errno
import signal
import threading
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


# Where `pip install .` (not -e) puts the folders beside the scripts: setup.py's data_files, under the
# install's data root (sys.prefix for a venv or the system, the user base for --user).
SHARE = Path("share") / "ghostcars"


def project_dir(name: str) -> Path:
    """A folder of the project that is no Python module (recipes/, web/): beside this file in a checkout or an
    editable install; else under <data root>/share/ghostcars/ where a plain `pip install .` copied it. When
    neither exists, the checkout's path, so that an error names where the folder belongs."""
    beside = Path(__file__).resolve().parent
    if (beside / name).is_dir():
        return beside / name
    import site
    import sysconfig
    # beside: `pip install --target DIR` puts share/ in DIR itself, next to the modules
    roots = [beside, Path(sysconfig.get_path("data")), Path(sys.prefix), Path(site.getuserbase())]
    return next((r / SHARE / name for r in roots if (r / SHARE / name).is_dir()), beside / name)


def pick_device(name: str) -> torch.device:
    """--device for every script: 'auto' -> cuda when present, else cpu; ValueError (one line) for a
    name that is no device or a CUDA device torch cannot see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return device


def cpu_name() -> str:
    """The CPU's model name for benchmark records (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): benchmark records state it, since
    another busy process changes every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a timer must not stop before the kernels do)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_models(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], runs: int,
                warmup: int = 5, desc: str = "") -> dict[str, list[float]]:
    """Seconds per forward for each model, timing rounds interleaved across the models.

    Interleaving (round r times every model once, starting with a different model each round)
    spreads slow phases of a shared machine, and any after-effect of the previous model on caches,
    over all models alike instead of penalising whichever model happened to run during them.
    """
    names = list(models)
    for name in names:  # warm-up: allocator, oneDNN primitive caches, cudnn autotune
        for _ in range(warmup):
            models[name](inputs[name])
        sync(inputs[name].device)
    times: dict[str, list[float]] = {n: [] for n in names}
    rounds = range(runs)
    if desc:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc=desc, leave=False, file=sys.stderr)
    for r in rounds:
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            dev = inputs[name].device
            sync(dev)
            t0 = time.perf_counter()
            models[name](inputs[name])
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    return times


class UsageError(Exception):
    """A problem with the options or the launch that the user fixes: one line naming the fix (exit 2)."""


class WriteError(Exception):
    """A file could not be written (full disk, read-only folder, I/O error): one line naming it and the fix."""


# what to do about the usual causes of a failed write
_WRITE_FIXES = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some of your disk quota",
                errno.EROFS: "write to another folder (--out)", errno.EACCES: "write to a folder you may write to",
                errno.EPERM: "write to a folder you may write to", errno.EIO: "check the disk"}


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """write(file) into a temp file in the same folder, fsync, then os.replace: a crash at any moment leaves
    either the old file or the new one, never a torn one. A failed write leaves the old file as it was and
    no temp file, and raises WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            fix = _WRITE_FIXES.get(e.errno, "check the folder and the disk")
            raise WriteError(f"{path}: cannot write ({e.strerror or e}); {fix}; the previous {path.name} "
                             f"is unchanged") from e
        raise


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


class StopSignals:
    """SIGTERM and SIGUSR1, a cluster's notice before it reclaims the node (SLURM sends SIGUSR1 ahead of time
    with --signal, Kubernetes and spot instances SIGTERM): the loop finishes the step it is in, saves last.pt
    at that step, prints the resume command and exits 128 + the signal (143 for SIGTERM). Installed for
    one-process runs; under torchrun the ranks would stop at different steps, so there a signal ends the
    processes as usual and torchrun's restart resumes from the last completed epoch (docs/reliability.md)."""
    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self, install: bool = True) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict = {}
        if install and threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for name in self.NAMES:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
