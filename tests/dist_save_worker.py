"""torchrun worker for tests/test_distributed_save.py: a checkpoint save in which one rank
fails, on 2 gloo ranks.

    torchrun --nproc_per_node 2 tests/dist_save_worker.py RUN_DIR FAULT

FAULT names where the fault is injected: ``write@0`` (rank 0 runs out of disk while writing
its files), ``create@0`` (rank 0 cannot create the checkpoint directory), ``write@1`` (rank
1's own file), or ``stall@1`` (rank 1 reaches the agreement ``STALL_S`` late; the others
wait ``timeout_s`` = 3 s). Each rank writes the one line it stopped with (or ``saved``) to
``RUN_DIR/rank<R>.txt`` and exits with 3 after an error, so the test sees every rank end.
"""

from __future__ import annotations

import errno
import sys
import time
from pathlib import Path

import torch

import prefix_rft.run.checkpoint as ckpt
from prefix_rft.runtime.distributed import destroy_distributed, get_rank, init_distributed

TIMEOUT_S, STALL_S = 3.0, 12.0  # the save's agreement timeout; how late a stalled rank comes


def _inject(fault: str) -> None:
    where, _, rank = fault.partition("@")
    if int(rank) != get_rank():
        return
    if where == "write":  # the first file a rank writes is its RNG state
        def full_disk(obj, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        ckpt._save_torch = full_disk
    elif where == "create":
        def no_mkdir(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(self))

        Path.mkdir = no_mkdir
    elif where == "stall":
        def stall(*args, **kwargs):
            time.sleep(STALL_S)

        ckpt._write_files = stall


def main() -> int:
    run_dir, fault = Path(sys.argv[1]), sys.argv[2]
    init_distributed("cpu", timeout_s=120.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    _inject(fault)
    report = run_dir / f"rank{get_rank()}.txt"
    try:
        ckpt.save_checkpoint(run_dir, 1, model=model, timeout_s=TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 -- the line each rank stops with is the result
        report.write_text(f"{type(err).__name__}: {err}")
        return 3
    report.write_text("saved")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
