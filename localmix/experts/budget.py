"""How a memory budget becomes expert slots: what stays resident whatever the budget (dense
weights, a KV cache, the runtime, shadow copies where kept), and how many experts the rest holds.
"""

from __future__ import annotations

import re

from localmix.errors import LocalmixError
from localmix.experts.shadows import shadow_bytes

MIB = 1 << 20
RUNTIME_BYTES = 300 * MIB  # Python, numpy, Numba and their compiled kernels: measured ~260 MB
UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'12GB', '12 GiB', '800MB' or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].upper() not in UNITS:
        raise LocalmixError(f"--memory: cannot read {text!r}; write it as 12GB, 800MB or 16GiB")
    return int(float(m[1]) * UNITS[m[2].upper()])


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_bytes(args, context: int) -> int:
    return 2 * 4 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * context


def fixed_memory(manifest: dict, args, context: int = 4096, shadow_bits: int = 0) -> int:
    """What stays resident whatever the budget: dense weights, a KV cache of `context` float32
    tokens, the runtime and the experts' shadow copies, if kept."""
    shadows = shadow_bytes(manifest, shadow_bits) if shadow_bits else 0
    return manifest["files"]["dense.bin"]["size"] + kv_bytes(args, context) + RUNTIME_BYTES + shadows


def minimum_memory(manifest: dict, args, context: int = 4096, shadow_bits: int = 0) -> int:
    """The smallest budget that runs the model: the fixed part and one token's experts (all of
    a dense model's MLPs, which are not cached)."""
    experts = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    return fixed_memory(manifest, args, context, shadow_bits) + (
        args.num_experts_per_tok * max(experts) if args.is_moe else sum(experts))


def plan_memory(manifest: dict, args, memory: str | int | None, context: int = 4096,
                shadow_bits: int = 0) -> tuple[int | None, str | None]:
    """How many expert slots a budget leaves: (slots, note). slots None: the whole model stays
    resident. The budget covers the dense weights, a KV cache of `context` float32 tokens, the
    runtime (RUNTIME_BYTES), the experts' shadow copies where asked for, and the slots. Without a
    budget, a model that does not fit the memory available gets 90% of it, and the note says so."""
    if not args.is_moe:
        return None, None
    expert_sizes = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    whole = fixed_memory(manifest, args, context) + sum(expert_sizes)
    note = None
    if memory is None:
        available = available_memory()
        if available is None or whole <= available:
            return None, None
        budget = int(available * 0.9)
        note = (f"the model needs {whole / 1e9:.1f} GB and {available / 1e9:.1f} GB are available: "
                f"running within {budget / 1e9:.1f} GB (set it with --memory)")
    else:
        budget = parse_memory(memory)
    if budget >= whole:  # everything fits: no cache, and no shadow copies needed
        return None, note
    fixed = fixed_memory(manifest, args, context, shadow_bits)
    slots = (budget - fixed) // max(expert_sizes)
    if slots < args.num_experts_per_tok:
        dense = manifest["files"]["dense.bin"]["size"]
        kv_and_runtime = fixed_memory(manifest, args, context) - dense
        shadows = (f", {shadow_bits}-bit shadow copies {shadow_bytes(manifest, shadow_bits) / 1e9:.2f} GB"
                   if shadow_bits else "")
        raise LocalmixError(f"--memory {budget / 1e9:.2f} GB is too small for this model: it needs at least "
                            f"{minimum_memory(manifest, args, context, shadow_bits) / 1e9:.2f} GB (dense weights "
                            f"{dense / 1e9:.2f} GB, KV cache and runtime {kv_and_runtime / 1e9:.2f} GB"
                            f"{shadows}, {args.num_experts_per_tok} experts)")
    return int(min(slots, len(expert_sizes) - 1)), note
