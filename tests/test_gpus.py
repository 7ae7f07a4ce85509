"""GPU discovery: nvidia-smi and salt output read, NVML asked, and devices chosen for a child session.

The outputs under ``tests/data/gpus/`` are written in nvidia-smi's and salt's
formats; the runners and ``pynvml`` are injected, so no test here needs a GPU
except the one marked ``cuda``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import ptutils
from ptutils.errors import GpuDiscoveryError, PtutilsError
from ptutils.gpus import (
    QUERY,
    Gpu,
    Node,
    Placement,
    choose_devices,
    cluster_nodes,
    local_gpus,
    parse_nvidia_smi,
    parse_salt,
)

DATA = Path(__file__).parent / "data" / "gpus"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def done(stdout: str = "", returncode: int = 0, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(args=[], returncode=returncode, stdout=stdout, stderr=stderr)


def node_of(name: str, csv: str) -> Node:
    return Node(name, tuple(parse_nvidia_smi(recorded(csv), node=name)))


@pytest.fixture
def no_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import pynvml`` fails, whether or not nvidia-ml-py is installed here."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


# -- parsing nvidia-smi ---------------------------------------------------------


def test_one_gpu_line_is_read_field_by_field():
    (gpu,) = parse_nvidia_smi(recorded("one_h200.csv"))
    assert gpu == Gpu(0, "GPU-5c1a7f3e-9b2d-4e8a-a1f0-3d6c2b9e8f71", 1024, 143771, 37)
    assert gpu.memory_free_mib == 143771 - 1024


def test_eight_gpus_keep_their_order_and_blank_lines_are_skipped():
    gpus = parse_nvidia_smi("\n" + recorded("eight_a100.csv") + "\n\n")
    assert [g.index for g in gpus] == list(range(8))
    assert [g.utilization_pct for g in gpus] == [0, 98, 0, 12, 100, 5, 71, 3]
    assert {g.memory_total_mib for g in gpus} == {81920}


def test_na_utilization_counts_as_idle():
    gpus = parse_nvidia_smi(recorded("na_utilization.csv"))
    assert [g.utilization_pct for g in gpus] == [0, 25]
    assert parse_nvidia_smi("0, GPU-x, 1, 2, N/A")[0].utilization_pct == 0


def test_na_memory_is_an_error_naming_node_line_number_and_text():
    with pytest.raises(GpuDiscoveryError) as caught:
        parse_nvidia_smi(recorded("malformed.csv"), node="gpu-a")
    bad = recorded("malformed.csv").splitlines()[1]
    message = str(caught.value)
    assert message.startswith(f"node 'gpu-a', line 2 {bad!r}: ")
    assert "memory.used" in message and "'[N/A]'" in message
    assert (caught.value.node, caught.value.line_number, caught.value.line) == ("gpu-a", 2, bad)
    assert isinstance(caught.value, PtutilsError)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("0, GPU-x, 1024, 81559", "expected 5 fields"),
        ("0, GPU-x, 1024, 81559, 37, 9", "expected 5 fields"),
        ("zero, GPU-x, 1024, 81559, 37", "index is not a non-negative integer: 'zero'"),
        ("0, GPU-x, 1024, -5, 37", "memory.total is not a non-negative integer: '-5'"),
        ("0, GPU-x, 1024, 81559, 3.5", "utilization.gpu is not a non-negative integer: '3.5'"),
        ("0, , 1024, 81559, 37", "uuid is empty"),
    ],
)
def test_a_malformed_line_is_refused_with_what_is_wrong(line, complaint):
    with pytest.raises(GpuDiscoveryError, match=f"^node 'localhost', line 1 .*: {complaint}"):
        parse_nvidia_smi(line)


# -- this machine ---------------------------------------------------------------


def test_local_gpus_runs_the_query_through_nvidia_smi_without_pynvml(no_pynvml):
    calls = []

    def run(args, **kwargs):
        calls.append((args, kwargs))
        return done(recorded("eight_a100.csv"))

    assert len(local_gpus(run=run)) == 8
    ((args, kwargs),) = calls
    assert args[0] == "nvidia-smi" and " ".join(args) == QUERY
    assert kwargs["capture_output"] is True and kwargs["text"] is True and kwargs["timeout"] == 30


def test_no_nvidia_smi_means_a_cpu_machine(no_pynvml):
    def run(args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", args[0])

    assert local_gpus(run=run) == []


@pytest.mark.parametrize(
    "failed",
    [
        done("No devices were found\n", returncode=6),
        done(returncode=9, stderr="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                                  "Make sure that the latest NVIDIA driver is installed and running.\n"),
    ],
)
def test_nvidia_smi_without_devices_or_driver_means_a_cpu_machine(no_pynvml, failed):
    assert local_gpus(run=lambda *a, **k: failed) == []


def test_nvidia_smi_failing_otherwise_is_an_error(no_pynvml):
    lost = done(returncode=15, stderr="Unable to determine the device handle for GPU0000:1B:00.0: GPU is lost\n")
    with pytest.raises(GpuDiscoveryError, match="^node 'localhost': nvidia-smi exited 15: Unable to .* GPU is lost$"):
        local_gpus(run=lambda *a, **k: lost)

    def hangs(args, **kwargs):
        raise subprocess.TimeoutExpired(args, kwargs["timeout"])

    with pytest.raises(GpuDiscoveryError, match="^node 'localhost': nvidia-smi did not answer within 30 s$"):
        local_gpus(run=hangs)


class FakeNVMLError(Exception):
    pass


def fake_pynvml(devices: list[dict], *, init_fails: bool = False) -> types.ModuleType:
    """A stand-in for nvidia-ml-py over ``devices`` (uuid, used/total bytes, utilization or None if unsupported)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNVMLError
    module.calls = []

    def init():
        module.calls.append("init")
        if init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def utilization(handle):
        if devices[handle]["util"] is None:
            raise FakeNVMLError("Not Supported")
        return types.SimpleNamespace(gpu=devices[handle]["util"], memory=0)

    module.nvmlInit = init
    module.nvmlShutdown = lambda: module.calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(devices)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetUUID = lambda h: devices[h]["uuid"]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=devices[h]["used"], total=devices[h]["total"], free=devices[h]["total"] - devices[h]["used"])
    module.nvmlDeviceGetUtilizationRates = utilization
    return module


def test_local_gpus_asks_nvml_when_pynvml_imports(monkeypatch):
    mib = 1024 * 1024
    nvml = fake_pynvml([
        {"uuid": "GPU-aaaa", "used": 1024 * mib, "total": 143771 * mib, "util": 37},
        {"uuid": b"GPU-bbbb", "used": 0, "total": 143771 * mib, "util": None},
    ])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    def run(*args, **kwargs):
        raise AssertionError("nvidia-smi was run although NVML answered")

    assert local_gpus(run=run) == [
        Gpu(0, "GPU-aaaa", 1024, 143771, 37),
        Gpu(1, "GPU-bbbb", 0, 143771, 0),
    ]
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_without_a_driver_falls_back_to_nvidia_smi(monkeypatch):
    nvml = fake_pynvml([], init_fails=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert local_gpus(run=lambda *a, **k: done(recorded("one_h200.csv")))[0].memory_total_mib == 143771
    assert nvml.calls == ["init"]


def test_nvml_failing_mid_listing_is_an_error_and_still_shuts_down(monkeypatch):
    nvml = fake_pynvml([{"uuid": "GPU-aaaa", "used": 0, "total": 1, "util": 0}])

    def lost(handle):
        raise FakeNVMLError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = lost
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(GpuDiscoveryError, match="^node 'localhost': NVML failed while listing GPUs: GPU is lost"):
        local_gpus()
    assert nvml.calls == ["init", "shutdown"]


def test_the_module_imports_neither_torch_nor_pynvml():
    package = Path(ptutils.__file__).parent
    script = (
        "import sys, types\n"
        f"package = types.ModuleType('ptutils'); package.__path__ = [{str(package)!r}]\n"
        "sys.modules['ptutils'] = package\n"
        "import ptutils.gpus\n"
        "print(sorted(m for m in ('torch', 'numpy', 'pynvml') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_gpus_lists_every_cuda_device():
    gpus = local_gpus()
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # torch sees a subset; nvidia-smi sees them all
        assert len(gpus) >= torch.cuda.device_count()
    else:
        assert len(gpus) == torch.cuda.device_count()
    assert all(g.memory_total_mib > 0 and g.uuid.startswith(("GPU-", "MIG-")) for g in gpus)


# -- a cluster ------------------------------------------------------------------


def test_parse_salt_splits_the_output_by_minion():
    outputs = parse_salt(recorded("salt_three_minions.txt"))
    assert list(outputs) == ["gpu-a.cluster", "gpu-b.cluster", "gpu-c.cluster"]
    assert outputs["gpu-b.cluster"] == "Minion did not return. [No response]"
    assert outputs["gpu-c.cluster"].splitlines()[1] == "1, GPU-1b2c3d4e-4444-4f5a-8b6c-7d8e9f0a1b21, 512, 81559, 0"


def test_parse_salt_refuses_a_line_outside_any_minion():
    with pytest.raises(GpuDiscoveryError, match=r"^line 1 '    0, GPU-x, 1, 2, 3': salt output before any minion"):
        parse_salt("    0, GPU-x, 1, 2, 3\n")
    with pytest.raises(GpuDiscoveryError, match=r"^node 'gpu-a', line 3 '  half-indented': neither"):
        parse_salt("gpu-a:\n    0, GPU-x, 1, 2, 3\n  half-indented\n")


def test_salt_runs_once_and_a_silent_minion_is_a_node_with_an_error():
    calls = []

    def run(command, **kwargs):
        calls.append((command, kwargs))
        return done(recorded("salt_three_minions.txt"), returncode=1)

    nodes = cluster_nodes("salt '*' cmd.run '{query}'", run=run)
    assert calls == [(f"salt '*' cmd.run '{QUERY}'",
                      {"shell": True, "capture_output": True, "text": True, "timeout": 30})]
    assert [(n.name, len(n.gpus), n.error) for n in nodes] == [
        ("gpu-a.cluster", 2, None),
        ("gpu-b.cluster", 0, "Minion did not return. [No response]"),
        ("gpu-c.cluster", 2, None),
    ]


def test_salt_hosts_pick_the_minions_and_name_the_missing_one():
    text = recorded("salt_three_minions.txt").replace("[No response]", "[Not connected]")
    nodes = cluster_nodes("salt '*' cmd.run '{query}'", hosts=["gpu-c.cluster", "gpu-b.cluster", "gpu-z"],
                          run=lambda *a, **k: done(text))
    assert [(n.name, n.error) for n in nodes] == [
        ("gpu-c.cluster", None),
        ("gpu-b.cluster", "Minion did not return. [Not connected]"),
        ("gpu-z", "not in the salt output"),
    ]


def test_salt_minion_with_malformed_output_names_it_and_the_line():
    text = "gpu-a:\n    0, GPU-x, 1024, 81559, 5\ngpu-b:\n    0, GPU-y, lots, 81559, 5\n"
    with pytest.raises(GpuDiscoveryError, match=r"^node 'gpu-b', line 1 '0, GPU-y, lots, 81559, 5': memory.used"):
        cluster_nodes("salt '*' cmd.run '{query}'", run=lambda *a, **k: done(text))


def test_salt_that_answers_nothing_is_an_error():
    silent = done(returncode=2, stderr="Salt request timed out. The master is not responding.\n")
    with pytest.raises(GpuDiscoveryError, match="exited 2: Salt request timed out"):
        cluster_nodes("salt '*' cmd.run '{query}'", run=lambda *a, **k: silent)


def test_ssh_template_runs_per_host_and_a_failing_host_is_a_node_with_an_error():
    answers = {
        "gpu-a": done(recorded("busy.csv")),
        "gpu-b": subprocess.TimeoutExpired("ssh gpu-b", 5),
        "gpu-c": done(returncode=255, stderr="ssh: connect to host gpu-c port 22: Connection refused\n"),
        "cpu-d": done("No devices were found\n", returncode=6),
        "gpu-e": done(recorded("eight_a100.csv")),
    }
    commands = []

    def run(command, *, shell, capture_output, text, timeout):
        assert shell and capture_output and text and timeout == 5
        commands.append(command)
        host = command.split()[1]
        if isinstance(answers[host], Exception):
            raise answers[host]
        return answers[host]

    nodes = cluster_nodes("ssh {host} {query}", hosts=list(answers), run=run, timeout=5)
    assert sorted(commands) == sorted(f"ssh {host} {QUERY}" for host in answers)
    assert [(n.name, len(n.gpus), n.error) for n in nodes] == [
        ("gpu-a", 2, None),
        ("gpu-b", 0, "no answer within 5 s"),
        ("gpu-c", 0, "exit 255: ssh: connect to host gpu-c port 22: Connection refused"),
        ("cpu-d", 0, None),
        ("gpu-e", 8, None),
    ]
    assert choose_devices(nodes, count=2, min_free_mib=40_000, max_utilization_pct=50) == Placement("gpu-e", (0, 2))


def test_ssh_host_with_malformed_output_names_it_and_the_line():
    def run(command, **kwargs):
        return done(recorded("malformed.csv") if "gpu-b" in command else recorded("one_h200.csv"))

    with pytest.raises(GpuDiscoveryError, match=r"^node 'gpu-b', line 2 '1, GPU-7a6b5c4d-0001"):
        cluster_nodes("ssh {host} {query}", hosts=["gpu-a", "gpu-b"], run=run)


def test_a_host_name_is_shell_quoted_into_the_template():
    commands = []
    cluster_nodes("ssh {host} {query}", hosts=["gpu-a; reboot"],
                  run=lambda command, **k: commands.append(command) or done(recorded("one_h200.csv")))
    assert commands == [f"ssh 'gpu-a; reboot' {QUERY}"]


def test_a_host_template_needs_hosts():
    with pytest.raises(ValueError, match="hosts must name at least one host"):
        cluster_nodes("ssh {host} {query}", run=lambda *a, **k: done())


# -- choosing devices -----------------------------------------------------------


def test_count_two_takes_the_two_freest_gpus_ties_by_index():
    nodes = [node_of("gpu-e", "eight_a100.csv")]
    # GPUs 0 and 2 both have 81916 MiB free: the tie goes to the lower indices.
    assert choose_devices(nodes, count=1) == Placement("gpu-e", (0,))
    assert choose_devices(nodes, count=2) == Placement("gpu-e", (0, 2))
    assert choose_devices(nodes, count=3) == Placement("gpu-e", (0, 2, 7))


def test_min_free_and_max_utilization_exclude_gpus():
    nodes = [node_of("gpu-e", "eight_a100.csv")]
    assert choose_devices(nodes, count=6, min_free_mib=20_000).devices == (0, 1, 2, 3, 5, 7)
    assert choose_devices(nodes, count=6, min_free_mib=20_000, max_utilization_pct=50).on_cpu
    assert choose_devices(nodes, count=6, min_free_mib=41_000).on_cpu  # GPU 1 has 40960 free, GPU 6 21920


def test_a_busy_node_is_passed_over_for_the_next_one_then_the_cpu():
    busy, idle = node_of("gpu-a", "busy.csv"), node_of("gpu-b", "one_h200.csv")
    assert choose_devices([busy, idle], min_free_mib=10_000) == Placement("gpu-b", (0,))
    assert choose_devices([busy, idle], max_utilization_pct=90) == Placement("gpu-b", (0,))
    assert choose_devices([busy], min_free_mib=10_000) == Placement(None, ())
    assert choose_devices([busy, idle], count=2, min_free_mib=10_000).on_cpu


def test_nodes_that_did_not_answer_are_skipped_and_order_decides():
    silent = Node("gpu-a", (), error="no answer within 30 s")
    first, second = node_of("gpu-b", "one_h200.csv"), node_of("gpu-c", "eight_a100.csv")
    assert choose_devices([silent, first, second]).node == "gpu-b"
    assert choose_devices([silent, second, first]).node == "gpu-c"
    stale = Node("gpu-d", first.gpus, error="exit 255: Connection reset")  # GPUs listed, but no answer now
    assert choose_devices([stale, second]).node == "gpu-c"
    assert choose_devices([], count=1).on_cpu
    assert choose_devices([first], count=0).on_cpu
    with pytest.raises(ValueError, match="count must be >= 0"):
        choose_devices([first], count=-1)


def test_env_shows_only_the_placed_gpus_numbered_as_nvidia_smi_does():
    assert Placement("gpu-e", (0, 3)).env() == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,3"}
    cpu = Placement(None, ())
    assert cpu.on_cpu and not Placement("gpu-e", (0,)).on_cpu
    assert cpu.env()["CUDA_VISIBLE_DEVICES"] == ""  # empty, not unset: every GPU hidden


@pytest.mark.parametrize("placement", [Placement("gpu-e", (0, 3)), Placement(None, ())])
def test_a_placement_round_trips_through_json(placement):
    stored = json.loads(json.dumps(placement.to_dict()))
    assert Placement.from_dict(stored) == placement


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({"node": 3, "devices": [0]}, "'node' must be a string"),
        ({"node": "gpu-a", "devices": "0,3"}, "'devices' must be a list"),
        ({"node": "gpu-a", "devices": [0, True]}, "'devices' must be a list"),
        ({"node": "gpu-a", "devices": [-1]}, "'devices' must be a list"),
        ({"node": "gpu-a", "devices": []}, "a node exactly when it has devices"),
        ({"node": None, "devices": [0]}, "a node exactly when it has devices"),
    ],
)
def test_a_malformed_stored_placement_is_refused(data, complaint):
    with pytest.raises(ValueError, match=complaint):
        Placement.from_dict(data)
