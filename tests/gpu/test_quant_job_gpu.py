"""The distributed quantizer on GPUs: block inputs handed to tasks as CUDA IPC handles.

Run: ``PYTHONPATH=. python -m pytest tests/gpu/test_quant_job_gpu.py -q`` (needs Ray: the device bundle has it).
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from cluster.handoff import CudaHandoff, HandoffError
from quant.config import QuantConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _receive(h: CudaHandoff, q) -> None:
    """In a fresh process: copy the driver's tensor onto every GPU and send the copies back as numpy arrays
    (a CPU tensor would cross the queue as a file descriptor that dies with this process)."""
    q.put([h.copy_to(f"cuda:{i}", torch.bfloat16).float().cpu().numpy() for i in range(torch.cuda.device_count())])


def test_handoff_copies_across_processes_and_gpus():
    x = torch.randn(3, 257, 64, device="cuda:0", dtype=torch.bfloat16)[:, 1:]  # a view with a storage offset
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_receive, args=(CudaHandoff.of(x), q))
    p.start()
    got = q.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert len(got) == torch.cuda.device_count()
    for y in got:
        assert torch.equal(torch.from_numpy(y), x.float().cpu())


def test_unknown_gpu_is_a_handoff_error():
    h = CudaHandoff.of(torch.ones(4, device="cuda"))
    bad = CudaHandoff("GPU-00000000-0000-0000-0000-000000000000", h.rebuild_args)
    with pytest.raises(HandoffError, match="not visible"):
        bad.copy_to("cuda", torch.float32)


def test_job_with_ipc_inputs_equals_object_store_inputs(tiny_model_factory, tmp_path, monkeypatch):
    import ray

    from cluster.quantize_job import run_distributed

    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    calib_file = Path(__file__).resolve().parents[2] / "quant" / "data" / "calib.txt"  # shipped: no shared/ here
    cfg = dict(group_size=64, calib_dataset=str(calib_file), calib_samples=8, calib_seqlen=64)
    ray.init(include_dashboard=False, num_cpus=4)
    try:
        ipc = run_distributed(src, str(tmp_path / "ipc"), QuantConfig(**cfg), num_gpus=1)
        monkeypatch.setenv("RAYAWQ_CUDA_IPC", "0")
        store = run_distributed(src, str(tmp_path / "store"), QuantConfig(**cfg), num_gpus=1)
    finally:
        ray.shutdown()
    assert ipc.job_timings["cuda_ipc_inputs"] == 1.0 and store.job_timings["cuda_ipc_inputs"] == 0.0
    files = sorted(p.name for p in Path(tmp_path / "ipc").glob("*.safetensors"))
    assert files
    for name in files:
        assert (tmp_path / "ipc" / name).read_bytes() == (tmp_path / "store" / name).read_bytes(), name
