"""The model is checked against the parallel sizes before any process starts: one clear line from
the launcher (argparse's error, exit 2) and a ValueError from the Engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from checkpoints import make_checkpoint
from pipeserve import Engine
from pipeserve.config import EngineConfig, check_devices
from pipeserve.utils import free_port


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # 4 heads, 2 KV heads, intermediate 96, 3 layers
    path = str(tmp_path_factory.mktemp("cfg"))
    return make_checkpoint(path, "llama", layers=3, heads=4, kv_heads=2, intermediate=96)


def launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeserve.launch_server", "--device", "cpu"]
    cmd += ["--port", str(free_port()), *args]
    env = {k: v for k, v in os.environ.items() if k != "PIPESERVE_PP_LAYER_PARTITION"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("tp", "what"),
    [(3, "num_attention_heads (4)"), (4, "num_key_value_heads (2)")],
)
def test_tp_size_that_does_not_divide_the_model_is_refused_before_start(model_path, tp, what):
    message = f"tp_size {tp} does not divide the model's {what}"
    with pytest.raises(ValueError, match=re.escape(message)):
        Engine(model_path=model_path, device="cpu", tp_size=tp)
    out = launch("--model-path", model_path, "--tp-size", str(tp))
    assert out.returncode == 2, out.stderr
    assert f"error: {message}" in out.stderr
    assert "Traceback" not in out.stderr and "starting" not in out.stderr


def test_intermediate_size_is_checked_too(tmp_path):
    path = make_checkpoint(str(tmp_path), "llama", layers=2, heads=4, kv_heads=4, intermediate=90)
    with pytest.raises(ValueError, match=r"intermediate_size \(90\)"):
        Engine(model_path=path, device="cpu", tp_size=4)


def test_bad_layer_partition_names_the_flag_not_the_environment_variable(model_path):
    out = launch("--model-path", model_path, "--pp-size", "2", "--pp-layer-partition", "1,1")
    assert out.returncode == 2, out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert "--pp-layer-partition" in error and "sums to 2; the model has 3 layers" in error
    assert "PIPESERVE_PP_LAYER_PARTITION" not in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ValueError, match="pp_layer_partition"):
        Engine(model_path=model_path, device="cpu", pp_size=2, pp_layer_partition="1,1")


def refused_at_once(*args: str) -> str:
    """The launcher's one `error:` line for `args`: exit 2, no rank started, within 5 s or 1 s
    more than half again what importing torch and the config takes here now (on a slow or busy
    machine that import alone took 3-5 s; a rank started would import it once more)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, pipeserve.config"], check=True)
    bound = max(5.0, 1.5 * (time.monotonic() - start) + 1)
    start = time.monotonic()
    out = launch(*args)
    took = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    assert took < bound, (took, bound)
    assert "Traceback" not in out.stderr and "starting" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr
    return errors[0]


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_a_port_outside_1_to_65535_is_refused_before_start(port):
    assert f"--port must be in 1..65535, got {port}" in refused_at_once("--port", port)


def test_context_length_above_the_models_positions_is_refused(model_path):
    with pytest.raises(ValueError, match=r"--context-length\) 9999 is above the model's"):
        Engine(model_path=model_path, device="cpu", context_length=9999)
    error = refused_at_once("--model-path", model_path, "--context-length", "9999")
    assert "max_position_embeddings" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_device_cuda_without_cuda_is_one_line_naming_the_flag():
    with pytest.raises(ValueError, match="no CUDA device"):
        Engine(device="cuda")
    error = refused_at_once("--device", "cuda")
    assert "--device" in error and "torch.cuda.is_available() is False" in error


def test_more_ranks_per_node_than_visible_gpus_is_refused():
    cfg = EngineConfig(pp_size=2, tp_size=2, nnodes=1, device="cuda")
    with pytest.raises(ValueError, match=r"puts 4 ranks on this node.*has 3 visible GPU"):
        check_devices(cfg, "cuda", gpus=3)
    check_devices(cfg, "cuda", gpus=4)
    check_devices(cfg.replace(nnodes=2), "cuda", gpus=2)
    check_devices(cfg, "cpu", gpus=0)


def test_an_unresolvable_dist_init_host_is_refused(model_path):
    addr = "no-such-host.invalid:29500"
    with pytest.raises(ValueError, match=r"cannot resolve host 'no-such-host\.invalid'"):
        Engine(model_path=model_path, device="cpu", dist_init_addr=addr)
    error = refused_at_once("--model-path", model_path, "--dist-init-addr", addr)
    assert "--dist-init-addr" in error and "cannot resolve" in error
    assert "is not host:port" in refused_at_once("--dist-init-addr", "127.0.0.1")


def test_kernel_switches_from_the_environment_are_checked():
    from pipeserve.env import Env

    on = ("PIPESERVE_PDL", "PIPESERVE_NARROW_TILES")
    off = ("PIPESERVE_WEIGHT_PREFETCH",)  # experimental
    for names, default in ((on, True), (off, False)):
        for name in names:
            field = name.removeprefix("PIPESERVE_").lower()
            assert getattr(Env.read({}), field) is default
            assert getattr(Env.read({name: str(int(not default))}), field) is not default
    for name in (*on, *off):
        assert Env.read({name: " "}) == Env.read({})  # empty: unset
        for bad in ("yes", "2", "-1"):
            with pytest.raises(ValueError, match=f"{name} must be 0 or 1"):
                Env.read({name: bad})


def test_the_launcher_checks_a_config_without_importing_torch(model_path):
    """The ranks import torch; the launcher's checks (the model against the parallel sizes, its
    layer split, dtypes, a CPU device) do not, so a bad flag is refused in a fraction of a second."""
    code = (
        "import sys\n"
        "from pipeserve.config import resolve_config\n"
        f"cfg = resolve_config(model_path={model_path!r}, pp_size=2, device='cpu', dtype='bf16')\n"
        "assert cfg.dtype == 'bfloat16', cfg.dtype\n"
        "try:\n"
        f"    resolve_config(model_path={model_path!r}, tp_size=3)\n"
        "except ValueError as e:\n"
        "    assert 'does not divide' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('tp_size 3 was accepted')\n"
        "print('torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIPESERVE_PP_LAYER_PARTITION"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_gpu_build_of_torch_is_told_from_its_version_file():
    from pipeserve.config import _torch_built_for_gpus

    assert _torch_built_for_gpus() == (
        torch.version.cuda is not None or torch.version.hip is not None
    )
