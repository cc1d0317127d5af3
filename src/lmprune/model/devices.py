"""Which device runs the work, how it is described in reports, and how its time is read."""

from __future__ import annotations

import time

import torch

from ..errors import LmpruneError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmpruneError(f"invalid --device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmpruneError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def describe_device(device: torch.device) -> str:
    """"cpu", or e.g. "cuda (NVIDIA H100 80GB HBM3)": reports and benchmarks say what hardware ran."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def device_clock(device: torch.device) -> float:
    """Wall time once the device's queued kernels have finished, so a timed phase is charged its own GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
