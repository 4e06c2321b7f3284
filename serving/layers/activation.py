"""SiLU(gate) * up on a fused gate/up output (one Triton kernel on GPU, the same one kernels/ fuses into its
split-K sum for AWQ layers)."""

from __future__ import annotations

import torch

from kernels.epilogue import silu_mul

from .triton_utils import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_mul(x, use_triton(x))
