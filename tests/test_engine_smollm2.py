"""Opt-in real-model smoke test: SmolLM2-135M, quantized (round-to-nearest AWQ, group 64), answers "Paris".

Runs when ``RAYAWQ_SMOLLM2`` names the model directory (or is 1 for /work/models/smollm2-135m).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from serving import EngineConfig, GenerationConfig
from tests.test_engine import make_awq_checkpoint

_env = os.environ.get("RAYAWQ_SMOLLM2", "")
MODEL = Path("/work/models/smollm2-135m" if _env == "1" else _env) if _env else None
pytestmark = pytest.mark.skipif(MODEL is None or not (MODEL / "config.json").is_file(),
                                reason="set RAYAWQ_SMOLLM2 to a SmolLM2-135M directory")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.parametrize("fmt", ["hf", "awq"])
def test_smollm2_answers_paris(tmp_path, fmt):
    from serving.pipeline import pipeline

    path = MODEL if fmt == "hf" else make_awq_checkpoint(MODEL, tmp_path / "awq", group_size=64,
                                                         scale_dtype=torch.bfloat16)
    pipe = pipeline(str(path), EngineConfig(dtype="float32", progress=False, session_len=512))
    out = pipe(QUESTION, GenerationConfig(max_new_tokens=16))
    assert "Paris" in out.text, out.text
