"""Every shipped Triton config compiles for sm_90 and sm_80 as a real launch specializes it.

The interpreter forgives what the GPU compiler rejects (shared memory, register spills), so
this builds real cubins with the ptxas bundled in the triton wheel -- no GPU needed -- through
benchmarks/compile_check.py, in a subprocess without TRITON_INTERPRET (the interpreter
replaces the jit functions).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_bundled() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_bundled(), reason="no ptxas bundled with this triton install")
def test_every_shipped_config_compiles_without_spills_within_smem_with_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"),
                           "--jobs", str(min(4, os.cpu_count() or 1))],
                          env=env, capture_output=True, text=True, timeout=900)
    table = done.stdout
    assert done.returncode == 0, table[-4000:] + done.stderr[-3000:]
    rows = [line for line in table.splitlines() if line.startswith("| sm")]
    # 2 families x 5 kernel variants x 2 dtypes, each checked: no spills, smem, wgmma
    assert len(rows) == 20, table
    assert all(line.rstrip().endswith("| ok |") for line in rows), table


@pytest.mark.skipif(not _ptxas_bundled(), reason="no ptxas bundled with this triton install")
def test_every_autotune_candidate_compiles_for_sm90_without_spills():
    from prefix_rft.kernels.triton_configs import AUTOTUNE_CANDIDATES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"),
                           "--candidates", "--jobs", str(min(4, os.cpu_count() or 1))],
                          env=env, capture_output=True, text=True, timeout=900)
    table = done.stdout
    assert done.returncode == 0, table[-4000:] + done.stderr[-3000:]
    rows = [line for line in table.splitlines() if line.startswith("| sm90")]
    assert len(rows) == sum(len(c) for c in AUTOTUNE_CANDIDATES.values()), table
    assert {"fwd", "bwd", "dz"} <= {line.split("|")[2].strip() for line in rows}
    assert all(line.rstrip().endswith("| ok |") for line in rows), table
