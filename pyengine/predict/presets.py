"""The preset device profiles, every number with its source.

h100 is calibrated against published H100 measurements: peaks from the datasheet; GEMM, link and
latency numbers taken from published measurements; the HBM streaming efficiency and the grouped
GEMM's rows-per-expert curve fitted to part of the vLLM PR #24700 rows (the other rows, and
every other published row in tests/predict/test_calibration.py, check the fit). h200 and
seed32g carry h100's efficiencies over, as assumptions. docs/planner_calibration.md has the
table, the fits and what the model leaves out. A GPU's own measured numbers come from
`pyengine calibrate` (a profile file, `--device FILE`).
"""

from __future__ import annotations

from pyengine.predict.device_profile import DeviceProfile, Source, SourceKind

D, P, F, A = SourceKind.DATASHEET, SourceKind.PUBLISHED, SourceKind.FIT, SourceKind.ASSUMPTION

VLLM_24700 = ("vLLM PR #24700 (H100 80GB HBM3, benchmarks/kernels/benchmark_moe.py "
              "--model=mistralai/Mixtral-8x7B-Instruct-v0.1 -tp=2, tuned config, whole fused_moe call)")
FIT_ROWS = (1, 4, 16, 64, 256, 1024)
"""Token counts of the vLLM #24700 rows the two fitted numbers were fitted to."""

H100_DATASHEET = Source(D, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5: 989 TFLOP/s dense bf16/fp16, "
                           "67 TFLOP/s fp32, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 per direction), "
                           "PCIe Gen5 128 GB/s (64 per direction)")
H100_SOURCES: dict[str, Source] = {
    **{f: H100_DATASHEET for f in ("peak_tflops_bf16", "peak_tflops_fp16", "peak_tflops_fp32", "hbm_gb_s",
                                   "memory_gb", "nvlink_gb_s", "pcie_gb_s")},
    "gemm_efficiency": Source(P, "stas00/ml-engineering compute/accelerator/README.md, Maximum Achievable Matmul "
                                 "FLOPS table (BF16): NVIDIA H100 SXM 794.5 of 989 TFLOP/s, best shape "
                                 "2048x2048x13312, torch 2.7.0+cu126, mean of 100 iterations after 50 warm-up"),
    "gemm_half_rows": Source(A, "0: the published dense rows (M >= 2048) show no dependence on M; below M ~ 300 "
                                "a GEMM over a weight matrix is memory-bound, where its FLOP rate does not matter"),
    "grouped_gemm_efficiency": Source(A, "equal to gemm_efficiency (the MAMF above): with many rows per expert a "
                                         "grouped GEMM is one dense GEMM per expert"),
    "grouped_gemm_half_rows": Source(F, f"fitted with hbm_efficiency to {VLLM_24700} at "
                                        f"{', '.join(map(str, FIT_ROWS))} tokens"),
    "hbm_efficiency": Source(F, f"fitted with grouped_gemm_half_rows to {VLLM_24700} at "
                                f"{', '.join(map(str, FIT_ROWS))} tokens"),
    "link_efficiency": Source(P, "NVIDIA/nccl issue #1455: 8x H100 SXM, NCCL_ALGO=RING all_reduce_perf "
                                 "-b 2G -e 4G -f 2 -g 2..8: bus bandwidth 365-370 GB/s for 2 to 8 GPUs; "
                                 "367.5 of the 450 GB/s line rate"),
    "nvlink_latency_us": Source(P, "NVIDIA/nccl issue #1984: 4x H800 over NVLink, sendrecv_perf -b 1024: 3.7 us "
                                   "at 1 KiB (H800: the same NVLink 4 generation with fewer links)"),
    "collective_base_us": Source(P, "NVIDIA/nccl issue #1984: 4x H800 over NVLink, NCCL_ALGO=Ring "
                                    "all_reduce_perf -b 1024 without CUDA graphs: 3.5 us at 1 KiB"),
    "collective_step_us": Source(F, "0: in NVIDIA/nccl issue #1984 a 4-GPU all-reduce (6 ring steps, 3.5 us) "
                                    "is no slower than one send/recv (3.7 us); the per-step cost is below "
                                    "what the published rows resolve"),
    "kernel_launch_us": Source(P, "meta-pytorch/tritonbench PR #1017: a no-op Triton kernel launched through "
                                  "its compiled-kernel binder with 19 arguments costs 5.6 us (a GB200 host: "
                                  "the launch path is host-side)"),
    "pcie_latency_us": Source(A, "6 us: no published PCIe message latency used (the pre-calibration value)"),
    "host_launch_us": Source(P, "meta-pytorch/tritonbench PR #1017: a no-op Triton kernel launched through its "
                                "compiled-kernel binder costs 5.6 us of host time; PyTorch eager ops cost "
                                "5 to 7 us each (the same order: 5.6 taken)"),
    "action_host_us": Source(A, "25 us: this runtime's Python per schedule action (dependency waits, events, "
                                "the transport call); no published figure applies; `pyengine calibrate` "
                                "measures it"),
    "graph_replay_us": Source(A, "one graph launch taken to cost the host one kernel launch (5.6 us); "
                                 "`pyengine calibrate` measures it"),
    "reserved_gb": Source(A, "1 GB for the CUDA context, NCCL buffers and allocator slack; not measured"),
}

H100 = DeviceProfile(
    name="h100", peak_tflops_bf16=989.0, peak_tflops_fp16=989.0, peak_tflops_fp32=67.0,
    hbm_gb_s=3350.0, memory_gb=80.0, nvlink_gb_s=450.0, nvlink_latency_us=3.7,
    pcie_gb_s=64.0, pcie_latency_us=6.0,
    hbm_efficiency=0.8609, link_efficiency=367.5 / 450, gemm_efficiency=794.5 / 989, gemm_half_rows=0.0,
    grouped_gemm_efficiency=794.5 / 989, grouped_gemm_half_rows=225.5,
    collective_base_us=3.5, collective_step_us=0.0, kernel_launch_us=5.6, reserved_gb=1.0,
    host_launch_us=5.6, action_host_us=25.0, graph_replay_us=5.6, sources=H100_SOURCES)

CALIBRATED = ("hbm_efficiency", "link_efficiency", "gemm_efficiency", "gemm_half_rows", "grouped_gemm_efficiency",
              "grouped_gemm_half_rows", "nvlink_latency_us", "collective_base_us", "collective_step_us",
              "kernel_launch_us", "pcie_latency_us", "reserved_gb", "host_launch_us", "action_host_us",
              "graph_replay_us")
"""The numbers h200 and seed32g take over from h100."""


def _carried(why: str) -> dict[str, Source]:
    return {f: Source(A, f"h100's value carried over ({why}); h100: {H100_SOURCES[f]}") for f in CALIBRATED}


H200 = DeviceProfile(
    name="h200", peak_tflops_bf16=989.0, peak_tflops_fp16=989.0, peak_tflops_fp32=67.0,
    hbm_gb_s=4800.0, memory_gb=141.0, nvlink_gb_s=450.0, pcie_gb_s=64.0,
    **{f: getattr(H100, f) for f in CALIBRATED},
    sources={**{f: Source(D, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: H100's compute (989 TFLOP/s "
                             "dense bf16/fp16, 67 fp32), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s "
                             "(450 per direction), PCIe Gen5 128 GB/s (64 per direction)")
                for f in H100_SOURCES if f not in CALIBRATED},
             **_carried("the same GH100 compute die; its HBM3e is not calibrated")})

SEED32G = DeviceProfile(
    name="seed32g", peak_tflops_bf16=125.0, peak_tflops_fp16=125.0, peak_tflops_fp32=15.7,
    hbm_gb_s=900.0, memory_gb=32.0, nvlink_gb_s=150.0, pcie_gb_s=16.0,
    **{f: getattr(H100, f) for f in CALIBRATED},
    sources={**{f: Source(D, "the seed's \"32 GB GPU\" taken as a V100-SXM2-32GB-class part (NVIDIA V100 "
                             "datasheet: 125 TFLOP/s fp16 tensor, 15.7 fp32, 32 GB HBM2 at 900 GB/s, NVLink2 "
                             "300 GB/s = 150 per direction, PCIe Gen3 16 GB/s per direction); a V100 has no "
                             "bf16 tensor cores: bf16 is assumed to run at the fp16 rate")
                for f in H100_SOURCES if f not in CALIBRATED},
             **_carried("a hypothetical part: no published figures of its own")})

PRESETS: dict[str, DeviceProfile] = {"h100": H100, "h200": H200, "seed32g": SEED32G}

DEFAULT_PRESET = "seed32g"
"""Profile used when none is named: the seed config describes 32 GB GPUs."""
