"""What the hardware does fast: used to pick the demo's default precision.

    python -m pipeline.run.hardware            # prints "bf16" or "fp32" and the reason on stderr

CUDA devices with bf16 support: bf16. CPUs: fp32, whatever their flags. Without AMX or AVX512-BF16 PyTorch
emulates bf16 matmuls several times slower than fp32 (BENCHMARKS.md, "Machine and software"). With AMX the
matmuls are fast, but the demo-sized model still trains slower in bf16 than in fp32 under DeepSpeed's bf16
engine on 2 CPU ranks (BENCHMARKS.md, "bf16 vs fp32 on this AMX CPU"), so fp32 is the faster choice there
too; ``native_bf16`` still reports what the CPU supports.
"""
from __future__ import annotations

import argparse
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


def default_precision() -> tuple[str, str]:
    """("bf16" | "fp32", why) for the demo's engine config."""
    import torch

    ok, why = native_bf16()
    if torch.cuda.is_available():
        return ("bf16" if ok else "fp32"), why
    if ok:
        return "fp32", f"{why}, but the demo model trains faster in fp32 on CPU ranks (BENCHMARKS.md)"
    return "fp32", why


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m pipeline.run.hardware", description=__doc__.split("\n\n")[0]
                            + " Prints bf16 or fp32 on stdout, the reason on stderr.").parse_args(argv)
    precision, why = default_precision()
    print(f"precision: {precision} ({why})", file=sys.stderr)
    print(precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
