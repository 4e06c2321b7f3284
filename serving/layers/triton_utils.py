"""When to take the Triton path: on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (how CPU tests run them)."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a Linux dependency
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and (x.is_cuda or INTERPRET)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
