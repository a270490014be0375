"""Compile a Triton kernel for a GPU architecture on a machine without that GPU.

Triton's compiler needs no GPU: only JITFunction.run asks the active driver which device
and target it is on. `stand_in_driver(arch)` answers with GPUTarget("cuda", arch, 32) for
as long as the `with` block runs, so `kernel.warmup(...)` goes through the kernel's own
launch path (binder, argument specialisation, options) and returns the CompiledKernel a
real launch would build, without launching. Resources come from what would be loaded:
shared memory from the compiled metadata plus the cubin's static part (cuobjdump),
registers from the cubin, spills from `ptxas -v` (the ptxas Triton uses for the arch).

The stand-in answers only what compiling needs; anything else (loading, launching)
raises AttributeError naming it. It is removed on exit even on error, and the compile's entry in the kernel's
per-device cache (keyed by the stand-in's own device key, never a device index) is
dropped, so real launches in the same process see neither.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nv_compiler
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, MockTensor

# Pointer arguments are written as "*<dtype>" in a job; MockTensor stands for the tensor
# (data_ptr 0: 16-byte aligned, as the caching allocator's blocks are).
POINTER_DTYPES = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32,
                  "*i32": torch.int32, "*i64": torch.int64}


class _StandInDriver:
    """The three answers JITFunction.run needs before it compiles; nothing else."""

    def __init__(self, arch: int):
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.device_key = f"compile-check-sm_{arch}"  # never equal to a real device index

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> str:
        return self.device_key

    def get_current_stream(self, device=None) -> int:
        return 0

    def __getattr__(self, name: str):
        # AttributeError, so hasattr()/getattr(default) probes see "absent" and go on.
        raise AttributeError(f"stand-in driver for sm_{self.arch}: {name!r} is not available "
                             "(compile only: nothing may be loaded or launched through it)")


@contextlib.contextmanager
def stand_in_driver(arch: int):
    """Make Triton compile for sm_<arch> inside the block; restore the previous driver after.

    The previous state is restored by assignment, not driver.reset_active(): that would
    create the real CUDA driver, which fails on a machine without a GPU.
    """
    saved = driver._active
    stand_in = _StandInDriver(arch)
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver._active = saved


def is_compilable(kernel) -> bool:
    """False for the interpreter's stand-ins (TRITON_INTERPRET=1 at import time)."""
    return isinstance(kernel, JITFunction)


def compile_kernel(kernel: JITFunction, args: list, meta: dict, arch: int):
    """CompiledKernel of `kernel` for sm_<arch>, specialised on `args` as a launch would be.

    args: ints/floats as launched, pointers as "*<dtype>" (POINTER_DTYPES); meta: the
    constexprs and launch options (num_warps, num_stages). Raises what Triton raises.
    """
    if not is_compilable(kernel):
        raise TypeError(f"{kernel!r}: not a JITFunction (imported under TRITON_INTERPRET=1?); "
                        "compile in a process without it")
    launch_args = [MockTensor(POINTER_DTYPES[a]) if isinstance(a, str) else a for a in args]
    with stand_in_driver(arch) as stand_in:
        try:
            return kernel.warmup(*launch_args, grid=(1,), **meta)
        finally:
            kernel.device_caches.pop(stand_in.device_key, None)


@dataclass(frozen=True)
class Resources:
    shared_bytes: int  # dynamic (metadata.shared) + static (cubin): what the launch needs
    registers: int
    spill_bytes: int  # spill stores, per thread
    mma: str  # wgmma / tcgen05 / mma.sync / none
    tmem_cols: int  # tensor memory columns (sm_100); 0 elsewhere


def mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the dots became (fp32 "ieee" dots use none: FMA)."""
    for needle, kind in (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync")):
        if needle in ptx:
            return kind
    return "none"


def resources(compiled, arch: int) -> Resources:
    """Shared memory, registers, spills and MMA kind of a CompiledKernel for sm_<arch>."""
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    regs, static = _cubin_usage(cubin)
    _, spills = ptxas_usage(ptx, arch, compiled.metadata.enable_fp_fusion)
    return Resources(shared_bytes=compiled.metadata.shared + static, registers=regs,
                     spill_bytes=spills, mma=mma_kind(ptx),
                     tmem_cols=getattr(compiled.metadata, "tmem_size", 0) or 0)


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool = True) -> tuple[int, int]:
    """(registers, spill-store bytes) from `ptxas -v` run as Triton runs it for sm_<arch>."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [_ptxas(arch), *_ptxas_flags(fp_fusion), "-v", f"--gpu-name={_sm_name(arch)}",
               str(src), "-o", str(src.with_suffix(".o"))]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas -v for {_sm_name(arch)} failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v output has no register/spill line: {out.stderr.strip()[-800:]}")
    return int(regs.group(1)), int(spills.group(1))


def _cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, static shared bytes) of the cubin Triton built, from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, timeout=120)
    m = re.search(r"REG:(\d+).*?SHARED:(\d+)", out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage failed ({out.returncode}): "
                           f"{(out.stderr or out.stdout).strip()[-800:]}")
    return int(m.group(1)), int(m.group(2))


def _ptxas(arch: int) -> str:
    return nv_compiler.get_ptxas(arch).path


def ptxas_version(arch: int) -> str:
    """CUDA release of the ptxas Triton uses for sm_<arch> (e.g. '12.9')."""
    return nv_compiler.get_ptxas(arch).version


def _sm_name(arch: int) -> str:
    return nv_compiler.sm_arch_from_capability(arch)


def _ptxas_flags(fp_fusion: bool) -> list[str]:
    """The flags Triton's make_cubin passes that change code generation (3.9 added
    --regAllocOptLevel=2; 3.6 has none), so the -v figures describe the cubin it built."""
    flags = ["-lineinfo"] + ([] if fp_fusion else ["--fmad=false"])
    if "--regAllocOptLevel=2" in inspect.getsource(nv_compiler.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")
    if knobs.nvidia.ptxas_options:
        flags += knobs.nvidia.ptxas_options.split()
    return flags
