"""Nothing the repository root puts on sys.path shadows an installed package.

`python -m pytest` (the README's test command) and any script run from the root put the root first
on sys.path. A regular package there named like a PyPI distribution (the top-level `kernels/` and
the PyPI `kernels` that transformers 5 imports) would be imported instead of it. So the root holds
no importable module or regular package but `pyengine`: `kernels/` has no `__init__.py` (it ships as
the namespace package `pyengine.kernels`), and a regular package of that name elsewhere on sys.path
wins over it."""

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_root_holds_no_importable_name_but_pyengine():
    names = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir()
                                                   if (p / "__init__.py").is_file()}
    assert names == {"pyengine"}, f"importable from the repository root: {sorted(names)}"


def test_an_installed_kernels_package_wins_over_the_root_kernels_dir(tmp_path):
    """A stand-in `kernels` distribution on sys.path after the root is the one imported, and
    pyengine.kernels still finds its modules."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed one'\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:] = [{str(ROOT)!r}, {str(site)!r}] + sys.path
        import kernels
        assert kernels.CUDAProperties == 'the installed one', kernels
        from pyengine.kernels.moe_align import moe_align_block_size
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
