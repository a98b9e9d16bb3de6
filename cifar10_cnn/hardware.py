"""Which device to train on, what it computes fast, and what a recipe's `auto` precision and memory format
become there.

bf16 pays only where the hardware has bf16 arithmetic: on a CPU without it (AMD Zen 3, Intel before
Cooper Lake) oneDNN emulates it and training is many times slower than in fp32 (docs/models-and-recipes.md).
So `auto` is a rule on capabilities the device reports, the same answer every time on the same
machine, never a timing: a run stays reproducible, and the tests pin the rule by handing `decide`
the capabilities of machines they are not running on.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import UserError
from .recipes import HARDWARE, TrainConfig

# Networks whose convolutions run faster in NHWC (channels-last) than in NCHW (`python -m bench.models`
# measures it); SimpleCNN's tiny convolutions gain nothing.
CHANNELS_LAST_FASTER = frozenset({"fastnet", "airnet", "airnet94", "vgg11", "vgg16", "resnet18"})


def select_device(requested: str) -> torch.device:
    """'auto' takes CUDA, then MPS, then the CPU; an explicit device must exist."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise UserError("device 'cuda' was requested but torch sees no CUDA GPU on this machine")
    if requested == "mps" and not mps:
        raise UserError("device 'mps' was requested but the Apple MPS backend is not available here")
    return torch.device(requested)


@dataclass(frozen=True)
class Capabilities:
    device: str  # cpu | cuda | mps
    name: str  # CPU model or GPU name
    native_bf16: bool  # bf16 arithmetic in hardware (AVX512_BF16 or AMX on x86, BF16 on Arm, CUDA sm80+)
    features: tuple[str, ...] = ()  # what we looked at, for the record: avx2, avx512, avx512_bf16, amx, vnni


def capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return Capabilities("cuda", torch.cuda.get_device_name(index),
                            torch.cuda.is_bf16_supported(including_emulation=False), (f"sm{major}{minor}",))
    if device.type == "mps":  # bf16 on MPS is partial and young: fp32 there
        return Capabilities("mps", "Apple GPU (MPS)", False)
    return cpu_capabilities()


def cpu_capabilities() -> Capabilities:
    cpu = torch.cpu
    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported",
              "vnni": "_is_vnni_supported"}
    features = tuple(name for name, probe in probes.items() if getattr(cpu, probe, lambda: False)())
    onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if platform.machine().lower() in ("x86_64", "amd64"):
        # oneDNN also says yes on plain AVX-512 (it emulates bf16 there): ask for the instructions.
        native = onednn_bf16 and ("avx512_bf16" in features or "amx" in features)
    else:  # Arm: oneDNN says yes only with the BF16 extension
        native = onednn_bf16
    return Capabilities("cpu", cpu_name(), native, features)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(caps: Capabilities) -> str:
    """One line for logs and benchmarks: 'cpu AMD EPYC (avx2; no native bf16), 2 threads'."""
    features = ", ".join(caps.features) or "no features probed"
    text = f"{caps.device} {caps.name} ({features}; {'native' if caps.native_bf16 else 'no native'} bf16)"
    return text + (f", {torch.get_num_threads()} threads" if caps.device == "cpu" else "")


def machine_line() -> str:
    """Today's date, the CPU with the features that decide precision, cores and torch: a benchmark's first line."""
    import datetime
    import os

    return (f"date {datetime.date.today()}; machine: {describe(cpu_capabilities())}, {os.cpu_count()} cores; "
            f"torch {torch.__version__}")


def decide(config: TrainConfig, caps: Capabilities) -> tuple[TrainConfig, dict[str, str]]:
    """`config` with HARDWARE precision and channels_last replaced for this device, and why, per field.

    Values the recipe or the user set explicitly are kept; bf16 without hardware support gets a warning.
    """
    why: dict[str, str] = {}
    precision, channels_last = config.precision, config.channels_last
    if precision == HARDWARE:
        precision = "bf16" if caps.native_bf16 else "fp32"
        why["precision"] = (f"auto: {caps.device} computes bf16 natively" if caps.native_bf16 else
                            f"auto: {caps.device} has no native bf16 (it would be emulated, many times slower)")
    elif precision == "bf16" and not caps.native_bf16:
        why["warning"] = (f"precision=bf16 was asked for, but this {caps.device} ({caps.name}) has no native bf16: "
                          "it is emulated and trains many times slower than fp32; precision=auto picks fp32 here")
    if channels_last == HARDWARE:
        channels_last = config.model in CHANNELS_LAST_FASTER and caps.device in ("cpu", "cuda")
        why["channels_last"] = (f"auto: {config.model} runs {'faster' if channels_last else 'no faster'} "
                                f"in NHWC on {caps.device}")
    return replace(config, precision=precision, channels_last=channels_last), why


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, or None where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB
