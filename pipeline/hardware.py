"""What the hardware does fast: used to pick a default precision.

    python -m pipeline.hardware            # prints "bf16" or "fp32" and the reason on stderr

bf16 is only fast where it is native: CUDA devices with bf16 support, and CPUs with AMX or AVX512-BF16.
On other CPUs PyTorch emulates bf16 matmuls, several times slower than fp32 (measured on a 2-core Xeon
without either flag: 1024^2 matmul 0.018 TFLOP/s in bf16 vs 0.066 in fp32), so fp32 is the faster choice.
"""
from __future__ import annotations

import sys
from pathlib import Path

NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """CPU feature flags from the text of /proc/cpuinfo."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> tuple[bool, str]:
    """(bf16 is native here, why)."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name(0)}: bf16 {'supported' if ok else 'not supported'}"
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_flags(cpuinfo.read_text()) if cpuinfo.is_file() else set()
    found = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, f"CPU has none of {', '.join(NATIVE_BF16_CPU_FLAGS)}: bf16 would be emulated (slower than fp32)"


def main() -> int:
    ok, why = native_bf16()
    print(f"precision: {'bf16' if ok else 'fp32'} ({why})", file=sys.stderr)
    print("bf16" if ok else "fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
