"""Data-parallel training on the existing engines: `tunelab train CONFIG --nproc N` starts N processes with
PyTorch's own launcher (torch.distributed.run, `--standalone`); the Hugging Face Trainer inside each sees the
launcher's environment and trains with DistributedDataParallel through accelerate (gloo on CPU, NCCL on GPU).
`train.batch_size` is per process: the global batch is N × batch_size × grad_accum.

Only rank 0 writes the run directory (config, status, metrics, the saved model, evaluation); the other ranks
train and leave. `accelerate launch --config_file configs/accelerate/...yaml -m tunelab train CONFIG` works the
same way for multi-GPU DDP, FSDP and DeepSpeed (see the README; only CPU/gloo is tested here). On CPU,
accelerate launch runs one process unless it goes through mpirun, hence this launcher.
"""
from __future__ import annotations

import os
import subprocess
import sys


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def launch(argv: list[str], nproc: int) -> int:
    """Run `tunelab ARGV` in `nproc` processes under torch.distributed.run; its exit status."""
    import torch

    from .errors import TunelabError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < nproc:  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") after loading everything
        raise TunelabError(f"--nproc {nproc} starts one process per GPU, but {gpus} GPU(s) are visible; use "
                           f"--nproc {gpus} or less, or CUDA_VISIBLE_DEVICES= to train {nproc} processes on the CPU")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunelab", *argv]
    env = dict(os.environ)
    # torch.distributed.run sets 1 thread per process when unset; share the cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"tunelab: {nproc} processes (torch.distributed.run): {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)


def quiet_other_ranks() -> None:
    """Ranks other than 0 print nothing to stdout (their errors still reach stderr)."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")
