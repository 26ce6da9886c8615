"""What a benchmark ran on: the machine and the library versions, for its JSON report.

A figure means little without them: the same command gives other numbers on another CPU, GPU
or torch release.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# The packages whose versions change what a benchmark measures.
LIBRARIES = ("rest-decoding", "torch", "transformers", "tokenizers", "numpy", "grpcio", "protobuf")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpu_name(device: str | None = None) -> str | None:
    """The CUDA device's name when ``device`` is a CUDA device (torch imported only then)."""
    if device is None or not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(device)


def machine(device: str | None = None) -> dict:
    """The machine: OS, CPU, cores, memory, load when the run started, and the GPU if used."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "load_average_1min": load,
        "device": str(device) if device is not None else "cpu",
        "gpu": gpu_name(device),
    }


def short_machine(info: dict) -> str:
    """One line for a chart title: the GPU if there is one, else the CPU and its cores."""
    if info.get("gpu"):
        return str(info["gpu"])
    return f"{info['cpu']} ({info['cores']} cores)"


def finish_run(results: dict, command: str, json_path: Path, load_at_start: float,
               report: Callable[[dict], str], **extra: str) -> dict:
    """The end of a service benchmark's run: ``results`` gets the machine (cores, Python, the
    1-minute load average at start and at end, ``extra``) and the command; the report is printed
    and the results written to ``json_path``."""
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), **extra,
                          "loadavg_1m_at_start": load_at_start,
                          "loadavg_1m_at_end": os.getloadavg()[0]}
    results["command"] = command
    print(report(results))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {json_path}")
    return results
