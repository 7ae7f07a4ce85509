"""GPU discovery: which GPUs a machine or a cluster has, and which of them a child session should get.

A tuning executor asks :func:`local_gpus` (NVML through ``pynvml`` when it is
installed, else ``nvidia-smi``) or :func:`cluster_nodes` (``nvidia-smi`` run over
ssh per host, or once through salt) what is there, then :func:`choose_devices`
for a :class:`Placement`: the node and the GPU indices a child gets, or the CPU.
``Placement.env()`` is the environment that makes the child see only those GPUs,
and ``to_dict``/``from_dict`` store a placement in a database record.

Nothing heavy is imported here: no torch, and ``pynvml`` only inside
:func:`local_gpus`.  Every runner is injectable, so the module is testable
without a GPU.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from .errors import GpuDiscoveryError

QUERY = "nvidia-smi --query-gpu=index,uuid,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits"
"""The nvidia-smi command whose CSV answer :func:`parse_nvidia_smi` reads."""

FIELDS = ("index", "uuid", "memory.used", "memory.total", "utilization.gpu")

_NOT_AVAILABLE = frozenset({"N/A", "[N/A]", "[Not Supported]"})
_NO_GPU = ("No devices were found", "couldn't communicate with the NVIDIA driver")
_NO_RETURN = "Minion did not return."
_NO_NVIDIA_SMI = re.compile(r"nvidia-smi: (command )?not found")
_MIB = 1024 * 1024

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@attrs.frozen
class Gpu:
    """One GPU as nvidia-smi or NVML reports it: its index, UUID, memory in MiB and utilization in percent."""

    index: int
    uuid: str
    memory_used_mib: int
    memory_total_mib: int
    utilization_pct: int

    @property
    def memory_free_mib(self) -> int:
        """Memory not in use, in MiB (never negative), which placement ranks GPUs by."""
        return max(self.memory_total_mib - self.memory_used_mib, 0)


@attrs.frozen
class Node:
    """A machine's GPUs; ``error`` says why it did not answer (then ``gpus`` is empty)."""

    name: str
    gpus: tuple[Gpu, ...] = ()
    error: str | None = None


@attrs.frozen
class Placement:
    """Where a child session runs: a node and its GPU indices, or the CPU (``node`` None, no devices)."""

    node: str | None
    devices: tuple[int, ...] = ()

    def __attrs_post_init__(self) -> None:
        if (self.node is None) != (not self.devices):
            raise ValueError(f"a placement has a node exactly when it has devices, got {self.node!r} {self.devices!r}")

    @property
    def on_cpu(self) -> bool:
        """True when no GPU was placed: the child runs on the CPU."""
        return self.node is None

    def env(self) -> dict[str, str]:
        """Environment for the child: only the placed GPUs visible (none on the CPU), numbered as nvidia-smi does."""
        return {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in self.devices),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (``{"node": ..., "devices": [...]}``) to store in a database record."""
        return {"node": self.node, "devices": list(self.devices)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Placement:
        """The placement ``to_dict`` stored; a field of the wrong type is refused by name."""
        node, devices = data.get("node"), data.get("devices", [])
        if node is not None and not isinstance(node, str):
            raise ValueError(f"placement field 'node' must be a string or None, got {node!r}")
        if not isinstance(devices, (list, tuple)) or not all(_is_index(d) for d in devices):
            raise ValueError(f"placement field 'devices' must be a list of GPU indices, got {devices!r}")
        return cls(node, tuple(devices))


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(node: str, number: int, line: str, field: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise GpuDiscoveryError(node, f"{field} is not a non-negative integer: {text!r}", line_number=number, line=line)
    return int(text)


def parse_nvidia_smi(text: str, node: str = "localhost") -> list[Gpu]:
    """The GPUs in :data:`QUERY`'s CSV answer; a malformed line raises GpuDiscoveryError naming node and line."""
    gpus = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(FIELDS):
            raise GpuDiscoveryError(
                node, f"expected {len(FIELDS)} fields ({', '.join(FIELDS)}), got {len(fields)}",
                line_number=number, line=line,
            )
        index, uuid, used, total, utilization = fields
        if not uuid:
            raise GpuDiscoveryError(node, "uuid is empty", line_number=number, line=line)
        gpus.append(Gpu(
            index=_count(node, number, line, "index", index),
            uuid=uuid,
            memory_used_mib=_count(node, number, line, "memory.used", used),
            memory_total_mib=_count(node, number, line, "memory.total", total),
            utilization_pct=0 if utilization in _NOT_AVAILABLE
            else _count(node, number, line, "utilization.gpu", utilization),
        ))
    return gpus


def _says_no_gpu(output: str) -> bool:
    return any(phrase in output for phrase in _NO_GPU)


def _nvml_gpus(pynvml: Any) -> list[Gpu]:
    gpus = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:  # not supported (e.g. a MIG device): counted as idle, as nvidia-smi's [N/A]
                utilization = 0
            gpus.append(Gpu(
                index=index,
                uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                memory_used_mib=int(memory.used) // _MIB,
                memory_total_mib=int(memory.total) // _MIB,
                utilization_pct=utilization,
            ))
    except pynvml.NVMLError as exc:
        raise GpuDiscoveryError("localhost", f"NVML failed while listing GPUs: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()
    return gpus


def local_gpus(run: Runner = subprocess.run, *, timeout: float = 30) -> list[Gpu]:
    """This machine's GPUs, through NVML when ``pynvml`` imports, else nvidia-smi; ``[]`` on a CPU machine."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            pass  # no driver for NVML: nvidia-smi below says whether this is a CPU machine
        else:
            return _nvml_gpus(pynvml)
    try:
        done = run(shlex.split(QUERY), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return []
    except subprocess.TimeoutExpired as exc:
        raise GpuDiscoveryError("localhost", f"nvidia-smi did not answer within {timeout} s") from exc
    if done.returncode != 0:
        output = f"{done.stdout or ''}\n{done.stderr or ''}"
        if _says_no_gpu(output):
            return []
        raise GpuDiscoveryError("localhost", f"nvidia-smi exited {done.returncode}: {_last_line(output)}")
    return parse_nvidia_smi(done.stdout, node="localhost")


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def parse_salt(text: str) -> dict[str, str]:
    """Each minion's output in ``salt '*' cmd.run`` text (``minion:`` then lines indented by 4 spaces), by minion id."""
    outputs: dict[str, list[str]] = {}
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("    "):
            if current is None:
                raise GpuDiscoveryError(None, "salt output before any minion id", line_number=number, line=line)
            outputs[current].append(line[4:])
        elif line.startswith("ERROR:"):
            continue  # salt's own summary, e.g. "ERROR: Minions returned with non-zero exit code"
        elif line.rstrip().endswith(":") and not line[0].isspace():
            current = line.rstrip()[:-1]
            if current in outputs:
                raise GpuDiscoveryError(current, "minion appears twice in the salt output",
                                        line_number=number, line=line)
            outputs[current] = []
        else:
            raise GpuDiscoveryError(current, "neither a minion id nor a line indented by 4 spaces",
                                    line_number=number, line=line)
    return {minion: "\n".join(lines) for minion, lines in outputs.items()}


def _node_from_output(name: str, output: str) -> Node:
    stripped = output.strip()
    if stripped.startswith(_NO_RETURN):
        return Node(name, (), error=stripped)
    if _says_no_gpu(stripped):
        return Node(name, ())
    if _NO_NVIDIA_SMI.search(stripped):
        return Node(name, (), error=_last_line(stripped))
    return Node(name, tuple(parse_nvidia_smi(output, node=name)))


def _query_host(template: str, host: str, run: Runner, timeout: float) -> Node:
    command = template.replace("{host}", shlex.quote(host)).replace("{query}", QUERY)
    try:
        done = run(command, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Node(host, (), error=f"no answer within {timeout} s")
    if done.returncode != 0:
        output = f"{done.stdout or ''}\n{done.stderr or ''}"
        if _says_no_gpu(output):
            return Node(host, ())
        return Node(host, (), error=f"exit {done.returncode}: {_last_line(output)}")
    return Node(host, tuple(parse_nvidia_smi(done.stdout, node=host)))


def cluster_nodes(
    template: str,
    hosts: Sequence[str] | None = None,
    run: Runner = subprocess.run,
    timeout: float = 30,
) -> list[Node]:
    """Every node's GPUs: ``template`` run per host if it has ``{host}`` (``"ssh {host} {query}"``), else once (salt).

    ``{query}`` becomes :data:`QUERY`.  A host that times out or exits non-zero
    is a Node with ``error`` set; malformed output raises GpuDiscoveryError
    naming the node and line.  Without ``{host}``, ``hosts`` (if given) picks
    and orders the minions, and one missing from the output is a Node with
    ``error`` set.
    """
    if "{host}" in template:
        if not hosts:
            raise ValueError("the template has {host}, so hosts must name at least one host")
        with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
            return list(pool.map(lambda host: _query_host(template, host, run, timeout), hosts))
    command = template.replace("{query}", QUERY)
    try:
        done = run(command, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise GpuDiscoveryError(None, f"{command!r} did not answer within {timeout} s") from exc
    outputs = parse_salt(done.stdout or "")
    if not outputs and done.returncode != 0:
        raise GpuDiscoveryError(None, f"{command!r} exited {done.returncode}: {_last_line(done.stderr or '')}")
    if hosts is None:
        return [_node_from_output(name, output) for name, output in outputs.items()]
    return [
        _node_from_output(host, outputs[host]) if host in outputs else Node(host, (), error="not in the salt output")
        for host in hosts
    ]


def choose_devices(
    nodes: Sequence[Node],
    count: int = 1,
    min_free_mib: int = 0,
    max_utilization_pct: int = 100,
) -> Placement:
    """The first answering node with ``count`` fitting GPUs, taking its freest (ties by index); else the CPU.

    A GPU fits with at least ``min_free_mib`` free and at most
    ``max_utilization_pct`` utilization; ``count=0`` asks for the CPU.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0:
        return Placement(None, ())
    for node in nodes:
        if node.error is not None:
            continue
        fitting = [g for g in node.gpus
                   if g.memory_free_mib >= min_free_mib and g.utilization_pct <= max_utilization_pct]
        if len(fitting) >= count:
            chosen = sorted(fitting, key=lambda g: (-g.memory_free_mib, g.index))[:count]
            return Placement(node.name, tuple(sorted(g.index for g in chosen)))
    return Placement(None, ())
