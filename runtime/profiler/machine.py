"""Machine facts: host memory, CPU name and cores, the profile's default name, the device to profile."""
from __future__ import annotations

import os
import platform
import re
import socket

import torch
from .config import ProbeFailure





def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def host_memory() -> tuple[int, int, str]:
    """(available bytes, total bytes, how it was read)."""
    info = meminfo()
    if "MemAvailable" in info and "MemTotal" in info:
        return info["MemAvailable"], info["MemTotal"], "/proc/meminfo MemAvailable"
    page = os.sysconf("SC_PAGE_SIZE")
    return (os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page,
            "os.sysconf(SC_AVPHYS_PAGES) (free pages; no /proc/meminfo)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def llc_text() -> str:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as fh:
            return fh.read().strip() + " as reported"
    except OSError:
        return "size unknown"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_tag() -> str:
    """A short file-name-safe form of the host name."""
    tag = re.sub(r"[^a-z0-9]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return tag[:20] or "host"


def default_name(device_kind: str) -> str:
    if device_kind == "cuda":
        gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower().replace("nvidia", "")).strip("-")
        return f"{gpu[:24]}-{host_tag()}"
    return f"cpu-{cpu_cores()}c-{host_tag()}"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeFailure("--device cuda asked for, but CUDA is not available")
    if dev.type not in ("cuda", "cpu"):
        raise ProbeFailure(f"device {device!r}: only cpu and cuda are profiled")
    return dev
