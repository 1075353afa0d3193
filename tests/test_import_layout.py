"""The top-level ``kernels/`` folder is ``prefix_rft.kernels``; run from the repository root,
where Python also sees it as a package named ``kernels``, it must not shadow Hugging Face's
``kernels`` package (which transformers imports)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_from_root(code: str, *extra_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter started in the repository root with only the root and
    ``extra_path`` importable beside the standard library (``-S``: no site-packages), as
    ``python -c`` from the root."""
    setup = (f"import sys; sys.path[:] = {[str(ROOT), *map(str, extra_path)]!r} "
             f"+ [p for p in sys.path if p]\n")  # the root, then the standard library
    return subprocess.run([sys.executable, "-S", "-c", setup + textwrap.dedent(code)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_top_level_kernels_name_hands_over_to_another_installed_package(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("CUDAProperties = 'the other package'\n")
    (other / "layers.py").write_text("WHO = 'submodule of the other package'\n")
    proc = _run_from_root("""
        import kernels
        from kernels import CUDAProperties
        from kernels.layers import WHO
        print(kernels.__file__, CUDAProperties, WHO, sep='|')
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    file, props, who = proc.stdout.strip().split("|")
    assert Path(file) == other / "__init__.py"
    assert (props, who) == ("the other package", "submodule of the other package")


def test_top_level_kernels_name_without_another_package_is_not_found():
    proc = _run_from_root("""
        try:
            import kernels
        except ModuleNotFoundError as err:
            print('not found', err.name, 'kernels' in sys.modules)
        else:
            print('imported', kernels.__file__)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "not found kernels False"


def test_transformers_imports_from_the_repository_root():
    """With the newest transformers this needs HF ``kernels``, not the repository's folder."""
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers.activations, kernels; "
                               "from prefix_rft.kernels import linear_logprob_entropy; "
                               "print(kernels.__file__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).parent != ROOT / "kernels"
