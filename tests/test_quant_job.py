"""The distributed quantization job on a real local Ray cluster (`ray start --head`, 2 CPU workers)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kernels.awq_layout import dequantize
from quant.config import QuantConfig
from quant.pipeline import quantize_model

ROOT = Path(__file__).resolve().parent.parent
PORT = 6391
DASHBOARD = 8271


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of 2 CPUs; workers inherit RAYAWQ_FAIL_ONCE_DIR for fault injection."""
    import ray

    fail_dir = tmp_path_factory.mktemp("faults")
    # A loopback test cluster: no token auth, whatever ~/.ray holds (Ray 2.60 turns it on for new clusters).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAYAWQ_FAIL_ONCE_DIR": str(fail_dir), "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
    subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env)
    subprocess.run(["ray", "start", "--head", f"--port={PORT}", "--num-cpus=2", "--include-dashboard=true",
                    f"--dashboard-port={DASHBOARD}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    address = f"127.0.0.1:{PORT}"
    ray.init(address=address)
    yield {"address": address, "fail_dir": fail_dir, "env": env}
    ray.shutdown()
    subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env, timeout=120)


def cfg(calib_file, **kw):
    return QuantConfig(group_size=64, calib_dataset=str(calib_file), calib_samples=4, calib_seqlen=64, **kw)


def assert_same_checkpoint(a_dir: Path, b_dir: Path, group_size: int = 64):
    """Equal up to float noise: workers run single-threaded, so reductions may round differently."""
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(".qweight"):
            base = k[: -len(".qweight")]
            wa = dequantize(a[k], a[base + ".qzeros"], a[base + ".scales"], group_size).float()
            wb = dequantize(b[k], b[base + ".qzeros"], b[base + ".scales"], group_size).float()
            assert (wa - wb).norm() / wa.norm() < 1e-3, k
            assert (a[k] == b[k]).float().mean() > 0.99, k
        elif not k.endswith((".qzeros", ".scales")):
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_distributed_equals_single_process(cluster, tiny_model_factory, calib_file, tmp_path, arch):
    from cluster.quantize_job import run_distributed

    src = str(tiny_model_factory(arch, num_hidden_layers=3))
    quantize_model(src, tmp_path / "single", cfg(calib_file), device="cpu", progress=False)
    summary = run_distributed(src, str(tmp_path / "dist"), cfg(calib_file), num_gpus=0, workers=2)
    assert sorted(b.index for b in summary.blocks) == [0, 1, 2]
    assert_same_checkpoint(tmp_path / "single", tmp_path / "dist")
    assert not (tmp_path / "dist.partial").exists()
    # the workers' start-up steps are stamped in order, and the finish is split into its parts
    jt = summary.job_timings
    assert 0 <= jt["worker_import"] <= jt["worker_imported"] <= jt["worker_init"] <= jt["worker_ready"]
    assert jt["worker_imported_transformers"] == 0.0  # a block worker never imports transformers (its cold start)
    assert {"finish_shards", "finish_publish", "finish_cleanup"} <= set(jt)


def test_a_block_goes_to_the_worker_that_frees_first():
    """Least loaded first; among equals the one whose latest block is oldest (taking the first of equals piled
    9 blocks on one of 4 GPUs and 7 on another)."""
    from cluster.quantize_job import _Dispatch

    d = _Dispatch(None, [None] * 4, {}, limit=5)
    try:
        d.load, d.last_sent = [1, 1, 1, 1], [4.0, 1.0, 3.0, 2.0]
        assert d.pick_worker() == 1
        d.load = [1, 2, 1, 0]
        assert d.pick_worker() == 3
    finally:
        d.writer.close()


def test_task_that_fails_once_is_retried(cluster, tiny_model_factory, calib_file, tmp_path):
    from cluster.quantize_job import run_distributed

    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    (cluster["fail_dir"] / "block-1.armed").touch()
    run_distributed(src, str(tmp_path / "dist"), cfg(calib_file), num_gpus=0, workers=2)
    assert (cluster["fail_dir"] / "block-1.fired").exists()  # the first attempt really died
    quantize_model(src, tmp_path / "single", cfg(calib_file), device="cpu", progress=False)
    assert_same_checkpoint(tmp_path / "single", tmp_path / "dist")
    (cluster["fail_dir"] / "block-1.armed").unlink()


def test_worker_killed_mid_block_is_restarted_and_the_block_redone(cluster, tiny_model_factory, calib_file, tmp_path):
    from cluster.quantize_job import run_distributed

    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    (cluster["fail_dir"] / "block-2.kill").touch()
    try:
        summary = run_distributed(src, str(tmp_path / "dist"), cfg(calib_file), num_gpus=0, workers=2)
    finally:
        (cluster["fail_dir"] / "block-2.kill").unlink()
    assert (cluster["fail_dir"] / "block-2.killed").exists()  # a worker process really died in block 2
    assert sorted(b.index for b in summary.blocks) == [0, 1, 2]
    quantize_model(src, tmp_path / "single", cfg(calib_file), device="cpu", progress=False)
    assert_same_checkpoint(tmp_path / "single", tmp_path / "dist")


def test_refused_job_gives_its_workers_back(cluster, tiny_model_factory, calib_file, tmp_path):
    import ray

    from cluster.quantize_job import run_distributed
    from quant.errors import QuantError

    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    (tmp_path / "dist").mkdir()  # exists and no overwrite: refused after the workers were placed
    with pytest.raises(QuantError, match="already exists"):
        run_distributed(src, str(tmp_path / "dist"), cfg(calib_file), num_gpus=0, workers=2)
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2  # no placement group or worker left holding a CPU


def job_cmd(src, out, calib, address, *extra):
    return [sys.executable, "-m", "cluster.quantize_job", str(src), "--work-dir", str(out), "--calib-dataset",
            str(calib), "--calib-samples", "4", "--calib-seqlen", "64", "--w-group-size", "64",
            "--num-gpus", "0", "--ray-address", address, *extra]


def test_killed_driver_resumes_with_only_the_rest(cluster, tiny_model_factory, calib_file, tmp_path):
    src = tiny_model_factory("llama", num_hidden_layers=8)
    out = tmp_path / "out"
    manifest = tmp_path / "out.partial" / "manifest.json"
    proc = subprocess.Popen(job_cmd(src, out, calib_file, cluster["address"], "--workers", "1"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            try:
                done = sum(n.startswith("block-") for n in json.loads(manifest.read_text())["parts"])
            except json.JSONDecodeError:
                done = 0
            if done >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sum(n.startswith("block-") for n in json.loads(manifest.read_text())["parts"])
    assert 2 <= finished < 8 and not out.exists()

    r = subprocess.run(job_cmd(src, out, calib_file, cluster["address"]), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("already done, skipped") == finished
    assert r.stdout.count(" done in ") == 8 - finished
    assert (out / "model.safetensors").is_file()


def test_ray_job_submit(cluster, tiny_model_factory, calib_file, tmp_path):
    src = tiny_model_factory("qwen2", num_hidden_layers=2)
    out = tmp_path / "submitted"
    entry = " ".join(job_cmd(src, out, calib_file, "auto")[1:])
    for _attempt in range(6):  # the head's job agent can come up a few seconds after the dashboard answers
        r = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD}", "--working-dir",
                            str(ROOT), "--", "python", *entry.split()],
                           cwd=ROOT, capture_output=True, text=True, timeout=420, env=cluster["env"])
        if "No available agent to submit job" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "block 2/2 done" in r.stdout
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["quantization_config"]["quant_method"] == "awq"


def test_ray_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["head_start_ray_commands"] and "8265" in " ".join(config["head_start_ray_commands"])
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    broken = {**config, "max_workers": "many"}
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_cli_quantize_with_ray_address(cluster, tiny_model_factory, calib_file, tmp_path):
    src = tiny_model_factory("mistral", num_hidden_layers=2)
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "quantize", str(src), "--work-dir", str(out),
                        "--calib-dataset", str(calib_file), "--calib-samples", "4", "--calib-seqlen", "64",
                        "--w-group-size", "64", "--ray-address", cluster["address"], "--num-gpus", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=cluster["env"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count(" done in ") == 2 and "mse(RTN)" in r.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32])
def test_array_round_trip_is_bit_exact_and_copies(dtype):
    from cluster.block_task import from_array, to_array

    t = (torch.randn(3, 5, 8) * 100).to(dtype)
    a = to_array(t)
    a.flags.writeable = False  # as the object store hands it over
    back = from_array(a, dtype)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    back.zero_()  # a copy: the read-only source is untouched
    assert torch.equal(from_array(a, dtype), t)


def test_block_writer_saves_in_order_and_surfaces_the_first_failure():
    from quant.pipeline import BlockWriter

    saved = []

    def save(i):
        if i == 2:
            raise OSError("disk full")
        saved.append(i)

    w = BlockWriter(save, max_pending=1)
    for i in range(2):
        w.submit(i)
    w.close()
    assert saved == [0, 1]

    w = BlockWriter(save, max_pending=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(2, 6):
            w.submit(i)
            time.sleep(0.05)
        w.close()
    assert saved == [0, 1]  # after the failure the rest are dropped, not saved out of order
    assert isinstance(w.close(raise_error=False), OSError)


def test_failed_save_keeps_finished_blocks_and_resumes(cluster, tiny_model_factory, calib_file, tmp_path,
                                                      monkeypatch):
    from cluster.quantize_job import run_distributed
    from quant.pipeline import QuantPlan

    src = str(tiny_model_factory("llama", num_hidden_layers=3))
    real_save = QuantPlan.save_block

    def flaky_save(self, tensors, report):
        if report.index == 2:
            raise OSError("injected write failure")
        real_save(self, tensors, report)

    monkeypatch.setattr(QuantPlan, "save_block", flaky_save)
    with pytest.raises(OSError, match="injected write failure"):
        run_distributed(src, str(tmp_path / "dist"), cfg(calib_file), num_gpus=0, workers=1)
    parts = json.loads((tmp_path / "dist.partial" / "manifest.json").read_text())["parts"]
    assert {"block-00000", "block-00001"} <= set(parts) and "block-00002" not in parts

    monkeypatch.setattr(QuantPlan, "save_block", real_save)
    summary = run_distributed(src, str(tmp_path / "dist"), cfg(calib_file), num_gpus=0, workers=1)
    assert summary.skipped == [0, 1] and [b.index for b in summary.blocks] == [2]
    assert set(summary.timings[2]) >= {"fp", "send", "rebuild", "search_pack", "save"}
    quantize_model(src, tmp_path / "single", cfg(calib_file), device="cpu", progress=False)
    assert_same_checkpoint(tmp_path / "single", tmp_path / "dist")


GPU_PICK_SCRIPT = r"""
import os, time, ray
from cluster.block_task import NOSET_ENV
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)  # its own, not the fixture's

@ray.remote
def probe():
    time.sleep(1.0)  # both tasks hold their GPU at once
    return os.environ.get("CUDA_VISIBLE_DEVICES"), [int(i) for i in ray.get_gpu_ids()]

task = probe.options(num_gpus=1, runtime_env={"env_vars": dict(NOSET_ENV)})
print("RESULT", ray.get([task.remote(), task.remote()]))
"""


def test_block_tasks_see_all_gpus_and_know_their_own():
    """The block tasks' env makes Ray leave CUDA_VISIBLE_DEVICES unset, and each task still learns its own GPU
    (a reused worker process cannot switch GPUs through CUDA_VISIBLE_DEVICES once CUDA is initialised)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", GPU_PICK_SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                       cwd=ROOT)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    results = eval(line[0][len("RESULT"):])
    assert [cvd for cvd, _ in results] == [None, None]
    assert sorted(ids[0] for _, ids in results) == [0, 1]
