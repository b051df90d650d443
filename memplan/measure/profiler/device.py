"""The measuring device: availability checks, the environment a record names,
and the CUDA allocator + NVML readings taken at the end of every phase.

The environment is read the same way in the campaign (which does not import
torch for a CPU campaign) and in the worker, so that `env_key` matches and a
campaign can skip setups already measured in the same environment.
"""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from typing import Any

from memplan.errors import DeviceUnavailableError

__all__ = ["check_device", "missing_profile_libraries", "collect_env", "env_key", "CudaMeter", "LIBRARIES", "PROFILE_LIBRARIES"]

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")
# What makes two measurements comparable: same device and the same library versions.
ENV_KEY_FIELDS = ("device_type", "device_name", "torch", "transformers", "peft", "bitsandbytes")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvml() -> Any:
    """pynvml (from nvidia-ml-py), initialised; DeviceUnavailableError if it cannot load."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError or pynvml.NVMLError_*: the library or driver is missing
        raise DeviceUnavailableError(
            f"--device cuda needs NVML (nvidia-ml-py and the NVIDIA driver), which cannot load here ({_short(exc)}); use --device cpu"
        ) from None
    return pynvml


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


# What every profiling run imports (the worker builds the model with transformers and adapts it with PEFT).
PROFILE_LIBRARIES = ("torch", "transformers", "peft", "safetensors")


def missing_profile_libraries() -> list[str]:
    """The profiler's libraries that are not installed (found without importing them)."""
    from importlib.util import find_spec

    return [name for name in PROFILE_LIBRARIES if find_spec(name) is None]


def check_device(device: str) -> None:
    """Raise DeviceUnavailableError (one line) if `device` cannot be profiled here: the profile
    extra is not installed, or (CUDA) no GPU, driver or NVML."""
    missing = missing_profile_libraries()
    if missing:
        raise DeviceUnavailableError(
            f"profiling needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            "install the profile extra: pip install 'memplan[profile]'"
        )
    if device != "cuda":
        return
    try:
        import torch
    except ImportError:
        raise DeviceUnavailableError(
            "--device cuda needs torch (pip install -e '.[profile]'); CUDA is not available on this machine; use --device cpu"
        ) from None
    if not torch.cuda.is_available():
        raise DeviceUnavailableError("--device cuda: CUDA is not available on this machine (no GPU or a CPU-only torch); use --device cpu")
    pynvml = _nvml()
    if pynvml.nvmlDeviceGetCount() < 1:
        raise DeviceUnavailableError("--device cuda: NVML sees no GPU on this machine; use --device cpu")


def _cuda_identity() -> dict[str, Any]:
    pynvml = _nvml()
    handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
    name = pynvml.nvmlDeviceGetName(handle)
    driver = pynvml.nvmlSystemGetDriverVersion()
    cuda_driver = pynvml.nvmlSystemGetCudaDriverVersion()
    return {
        "device_name": name.decode() if isinstance(name, bytes) else str(name),
        "device_total_memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        "driver_version": driver.decode() if isinstance(driver, bytes) else str(driver),
        "cuda_driver_version": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}",
    }


def _nvml_index() -> int:
    """NVML index of CUDA device 0: the first entry of CUDA_VISIBLE_DEVICES when it is numeric."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def collect_env(device: str) -> dict[str, Any]:
    """Host, library versions and device identity. Imports no torch."""
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device_type": device,
        "memplan": _version("memplan"),
    }
    for lib in LIBRARIES:
        env[lib] = _version(lib)
    if device == "cuda":
        env.update(_cuda_identity())
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
        env.update({"device_name": _cpu_name(), "device_total_memory_bytes": total, "cpu_count": os.cpu_count()})
    return env


def env_key(env: dict[str, Any]) -> str:
    """A stable string naming the environment for resume: device and library versions."""
    return "|".join(f"{k}={env.get(k)}" for k in ENV_KEY_FIELDS)


class CudaMeter:
    """torch.cuda allocator statistics and NVML readings, per phase.

    `torch.cuda.memory_allocated` / `max_memory_allocated` count tensor blocks;
    `memory_reserved` adds the caching allocator's cached segments
    (`torch/cuda/memory.py`); NVML's per-process figure adds the CUDA context,
    cuBLAS/cuDNN handles and anything allocated outside torch (paged optimizer
    state in unified memory shows only there, if resident).
    """

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.pynvml = _nvml()
        self.handle = self.pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
        self.pid = os.getpid()
        # Before this process touches the GPU: what the driver and others already use.
        self.baseline_used_bytes = int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        torch.cuda.init()
        # cudaDeviceSynchronize creates the primary context; no tensor exists yet.
        torch.cuda.synchronize(0)
        self.context_bytes = self.process_bytes()
        self.context_used_bytes = int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def process_bytes(self) -> int | None:
        """This process's GPU memory as NVML reports it; None where NVML does not say."""
        pynvml = self.pynvml
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = getattr(pynvml, getter)(self.handle)
            except pynvml.NVMLError:
                continue
            for p in procs:
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
        return None

    def begin(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, int | None]:
        cuda = self.torch.cuda
        cuda.synchronize()
        return {
            "allocated_bytes": int(cuda.memory_allocated()),
            "max_allocated_bytes": int(cuda.max_memory_allocated()),
            "reserved_bytes": int(cuda.memory_reserved()),
            "max_reserved_bytes": int(cuda.max_memory_reserved()),
            "nvml_used_bytes": int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used),
            "nvml_process_bytes": self.process_bytes(),
        }

    def identity(self) -> dict[str, Any]:
        props = self.torch.cuda.get_device_properties(0)
        return {
            "torch_device_name": props.name,
            "torch_total_memory_bytes": int(props.total_memory),
            "cuda_version": self.torch.version.cuda,
            "nvml_baseline_used_bytes": self.baseline_used_bytes,
            "nvml_context_used_bytes": self.context_used_bytes,
        }
