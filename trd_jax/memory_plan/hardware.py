"""Accelerators the planner knows (memory per device) and the recipes' hardware names."""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    label: str
    hbm_bytes: int  # memory per device (one GPU, one TPU chip)
    note: str = ""


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    # GPUs: JAX preallocates 75% of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
    Accelerator("h100-80gb", "NVIDIA H100 80GB", 80 * GiB,
                "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: JAX preallocates 75% of a GPU by default"),
    Accelerator("h200", "NVIDIA H200", 141 * GiB, "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"),
    Accelerator("a100-80gb", "NVIDIA A100 80GB", 80 * GiB, "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"),
    Accelerator("a100-40gb", "NVIDIA A100 40GB", 40 * GiB, "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"),
    Accelerator("v4", "TPU v4", 32 * GiB),
    Accelerator("v5p", "TPU v5p", 95 * GiB),
    Accelerator("v5e", "TPU v5e", 16 * GiB),
    Accelerator("v6e", "TPU v6e (Trillium)", 32 * GiB),
)}

# configs/qwen3.py's HARDWARE names -> (accelerator, devices of the mesh).
HARDWARE: dict[str, tuple[str, int]] = {"h100x8": ("h100-80gb", 8), "v5p-8": ("v5p", 4), "v5e-16": ("v5e", 16)}
