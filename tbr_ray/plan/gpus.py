"""GPU types the planner knows (pure data): what a GPU computes, holds and moves per second.

    GPU_TYPES["A100"].peak_flops      # 312e12: dense bf16 tensor FLOP/s
    tbr-ray ablate --config jobs/paper.yaml --dry-run --config-only --gpus 8 --gpu-type A100

Figures from NVIDIA's datasheets, read 2026-12-03 (dense, i.e. without 2:4 sparsity, which
the datasheets' headline figures include and LoRA training does not use):
  A100 SXM4 80GB   bf16 312 TFLOP/s, HBM2e 2,039 GB/s, NVLink 3 600 GB/s (both directions)
                   (nvidia.com A100 datasheet, "NVIDIA A100 Tensor Core GPU", 2021)
  H100 SXM5 80GB   bf16 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 900 GB/s
                   (nvidia.com H100 datasheet, "NVIDIA H100 Tensor Core GPU", 2023)
  H200 SXM 141GB   bf16 989 TFLOP/s, HBM3e 4.8 TB/s, NVLink 4 900 GB/s
                   (nvidia.com H200 datasheet, "NVIDIA H200 Tensor Core GPU", 2024)
  L40S 48GB        bf16 362 TFLOP/s, GDDR6 864 GB/s, no NVLink: PCIe Gen4 x16 64 GB/s
                   (nvidia.com L40S datasheet, 2023)
`memory_gib`: what nvidia-smi reports as the card's total (A100 81,920 MiB, H100 81,559,
H200 143,771, L40S 46,068). `max_num_seqs`: vLLM's default of concurrent sequences for its
offline `LLM` class on that device (vllm/engine/arg_utils.py, EngineArgs defaults: 1024 on
>= 70 GiB GPUs other than the A100, else 256). cluster/aws-gpu.yaml's node types:
p4de.24xlarge (8 x A100 80GB) and p5.48xlarge (8 x H100).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuType:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    memory_gib: float
    hbm_bytes_per_s: float  # device memory bandwidth
    link_bytes_per_s: float  # GPU-to-GPU within a node, one direction (NVLink, else PCIe)
    max_num_seqs: int  # vLLM's default concurrent sequences on this device


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("A100", 312e12, 80, 2.039e12, 300e9, 256),
        GpuType("H100", 989e12, 79.6, 3.35e12, 450e9, 1024),
        GpuType("H200", 989e12, 140.4, 4.8e12, 450e9, 1024),
        GpuType("L40S", 362e12, 45.0, 0.864e12, 32e9, 256),
    )
}
