"""What the target's CPU can do: a small descriptor read from ``/proc/cpuinfo``.

The quantization candidates are derived from it (``deployopt.candidates``), and every report
and history row records it. Which candidate *wins* is never decided from it: that is measured.

Why it matters (onnxruntime's quantization docs, "When to use reduce-range and per-channel
quantization"): without a VNNI-class dot-product instruction, onnxruntime's u8s8 int8 kernels
(``vpmaddubsw``) add pairs of 8-bit products into 16-bit lanes, which saturate. 7-bit weights
(``reduce_range``) or u8u8 kernels avoid it; with VNNI/AMX the products accumulate in 32 bits.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

# Features worth recording, in the spelling of Linux's /proc/cpuinfo flags. On Arm, "asimd"
# (Advanced SIMD) is recorded as "neon" and "asimddp" as "dotprod".
X86_FEATURES = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
)
ARM_FEATURES = ("neon", "fphp", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme")
ARM_SPELLING = {"asimd": "neon", "asimddp": "dotprod"}
# int8 dot products that accumulate in 32 bits: no u8s8 saturation
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "i8mm")


@dataclass(frozen=True)
class CpuDescriptor:
    """A CPU as the candidate generator sees it.

    >>> cpu = CpuDescriptor(model="test", arch="x86_64", cores=2, features=("avx2",))
    >>> cpu.int8_dot, cpu.describe()
    (False, 'test (x86_64, 2 cores; avx2)')
    """

    model: str
    arch: str
    cores: int
    features: tuple[str, ...] = ()

    @property
    def int8_dot(self) -> bool:
        """True when int8 products accumulate in 32 bits (VNNI, AMX, Arm dotprod/i8mm)."""
        return any(f in self.features for f in INT8_DOT_FEATURES)

    def has(self, feature: str) -> bool:
        return feature in self.features

    def describe(self) -> str:
        feats = ", ".join(self.features) or "no SIMD features recorded"
        return f"{self.model} ({self.arch}, {self.cores} cores; {feats})"

    def to_json(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        d["int8_dot"] = self.int8_dot
        return d


def parse_cpuinfo(text: str, arch: str, cores: int) -> CpuDescriptor:
    """A descriptor from the text of ``/proc/cpuinfo`` (x86 ``flags`` or Arm ``Features``).

    >>> parse_cpuinfo("model name : X\\nflags : fpu avx2 avx512_vnni\\n", "x86_64", 4).features
    ('avx2', 'avx512_vnni')
    """
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = {ARM_SPELLING.get(f, f) for f in value.split()}
    known = X86_FEATURES + ARM_FEATURES
    return CpuDescriptor(
        model=model or platform.processor() or "unknown",
        arch=arch,
        cores=cores,
        features=tuple(f for f in known if f in flags),
    )


@functools.cache
def detect_cpu() -> CpuDescriptor:
    """This machine's CPU. Cores are those this process may run on (cgroup/affinity aware)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine(), cores)
