"""How a memory budget becomes expert slots: the room the process has (a memory cgroup's limit
or the machine's), what stays resident whatever the budget (dense weights, the KV cache's first
room, the runtime, shadow copies where kept), and how many experts the rest holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localmix.errors import LocalmixError
from localmix.experts.shadows import shadow_bytes

MIB = 1 << 20
# A localmix process's own memory, loaded and before its first token (the interpreter, numpy,
# Numba, the kernels from Numba's cache, the tokenizer; VmRSS less the dense weights' pages):
# measured 170 MB for `localmix.load("mini-q4", memory="624MB")`, of which 89 MB shared libraries.
RUNTIME_BYTES = 180 * MIB
KV_FIRST_TOKENS = 512  # the KV cache's room planned up front; past it, each growth gives up expert slots
PROMPT_CHUNK = 256     # a prompt's tokens per model call (Generation.prefill)
UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_memory(text: str | int, option: str = "--memory") -> int:
    """'12GB', '12 GiB', '800MB' or a number of bytes (the option's value, named in the error)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].upper() not in UNITS:
        raise LocalmixError(f"{option}: cannot read {text!r}; write it as 12GB, 800MB or 16GiB")
    return int(float(m[1]) * UNITS[m[2].upper()])


@dataclass(frozen=True)
class Room:
    """The memory this process may still take (bytes), and what says so: a memory cgroup's limit
    (which charges the page cache too: a laptop of that size) or the system's MemAvailable."""
    available: int
    limit: int | None = None  # the cgroup's limit, where one is tighter than the machine
    where: str = "MemAvailable"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (v2): no limit


def _stat(path: Path, keys: tuple[str, ...]) -> int:
    """The first of `keys` found in a memory.stat file (0 where none)."""
    try:
        fields = dict(line.split()[:2] for line in path.read_text().splitlines() if len(line.split()) >= 2)
    except (OSError, UnicodeDecodeError, ValueError):
        return 0
    for key in keys:
        if key in fields and fields[key].isdigit():
            return int(fields[key])
    return 0


def cgroup_room(proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> Room | None:
    """The room left under the tightest memory cgroup limit over this process (its own cgroup and
    each parent's): limit minus what the cgroup holds that the kernel cannot reclaim (its memory
    less its page cache). cgroup v2 (memory.max) or v1 (memory.limit_in_bytes); None where no
    limit applies or none can be read."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    places = []  # (mount, path in it, version)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            places.append((root / "memory", path, 1))
        elif parts[0] == "0" and controllers == "":
            for mount in (root, root / "unified"):
                if (mount / "cgroup.controllers").is_file():
                    places.append((mount, path, 2))
                    break
    best = None
    for mount, path, version in places:
        here = mount / path.strip("/")
        if not here.is_dir():  # a container that sees its own cgroup as the root of the mount
            here = mount
        limit_file, usage_file = (("memory.max", "memory.current") if version == 2
                                  else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        cache_keys = ("file",) if version == 2 else ("total_cache", "cache")
        while True:
            limit, usage = _read_int(here / limit_file), _read_int(here / usage_file)
            if limit is not None and limit < 1 << 60 and usage is not None:
                held = max(0, usage - _stat(here / "memory.stat", cache_keys))
                room = Room(max(0, limit - held), limit, f"cgroup v{version} {'/' + path.strip('/')}")
                if best is None or room.available < best.available:
                    best = room
            if here == mount or mount not in here.parents:
                break
            here = here.parent
    return best


def memory_room() -> Room | None:
    """What this process may still take: the tighter of MemAvailable (Linux) and a memory cgroup's
    limit (see cgroup_room); None where neither is known (then no budget is chosen unasked)."""
    system = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    system = Room(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    limited = cgroup_room()
    if limited is None or (system is not None and system.available <= limited.available):
        return system
    return limited


def working_bytes(args) -> int:
    """The activations of one prompt chunk at their widest (the experts' rows of all its tokens:
    gate and up, SwiGLU, quantized), a bound with room to spare."""
    widest = max([args.intermediate_size, args.moe_intermediate_size * args.num_experts_per_tok,
                  args.shared_expert_intermediate_size])
    return PROMPT_CHUNK * (6 * widest + 16 * args.hidden_size) * 4


def runtime_bytes(args) -> int:
    """The process's memory outside the model's weights, KV cache and expert slots: the
    interpreter with numpy, Numba and the loaded kernels (RUNTIME_BYTES, measured), and a prompt
    chunk's activations."""
    return RUNTIME_BYTES + working_bytes(args)


def kv_bytes(args, context: int) -> int:
    """A float32 KV cache of `context` tokens."""
    return 2 * 4 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * context


def kv_first_bytes(args) -> int:
    """The KV cache's room planned up front: KV_FIRST_TOKENS, or the whole context if shorter."""
    return kv_bytes(args, min(KV_FIRST_TOKENS, args.max_position_embeddings))


def fixed_memory(manifest: dict, args, shadow_bits: int = 0) -> int:
    """What stays resident whatever the budget: dense weights, the KV cache's first room
    (KV_FIRST_TOKENS float32 tokens: as it grows past that, it takes expert slots' memory), the
    runtime (runtime_bytes) and the experts' shadow copies, if kept."""
    shadows = shadow_bytes(manifest, shadow_bits) if shadow_bits else 0
    return manifest["files"]["dense.bin"]["size"] + kv_first_bytes(args) + runtime_bytes(args) + shadows


def minimum_memory(manifest: dict, args, shadow_bits: int = 0) -> int:
    """The smallest budget that runs the model: the fixed part and one token's experts (all of
    a dense model's MLPs, which are not cached)."""
    experts = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    return fixed_memory(manifest, args, shadow_bits) + (
        args.num_experts_per_tok * max(experts) if args.is_moe else sum(experts))


UNASKED_SHARE = 0.9  # of the room, for a budget chosen unasked: the rest for the page cache's churn
# Unasked, a model whose room holds at least this share of what it needs is mapped whole and the
# system pages the rest. Measured inside memory cgroups, decode tok/s mapped vs in slots, with the
# share: the mini model (1.14 GB needed) in 1 GiB (0.90) 62 vs 36, 900 MiB (0.79) 30 vs 25, 800 MiB
# 19 vs 18, 700 MiB 14 vs 18; Mixtral 8x7B's shape with 2-bit experts (15.6 GB) in 12 GiB (0.82)
# 1.23 vs 1.58, at 4 bits (26.9 GB, 0.48) 0.51 vs 0.78. Where the two cross depends on the model;
# between 0.79 and 0.82 each side lost once, by 18% and 28%.
MAPPED_SHARE = 0.85


def plan_memory(manifest: dict, args, memory: str | int | None, shadow_bits: int = 0,
                room: Room | None = None) -> tuple[int | None, str | None]:
    """How many expert slots a budget leaves: (slots, note). slots None: the whole model stays
    resident. The budget is for the process: it covers the runtime (runtime_bytes), the dense
    weights, the KV cache's first room, the experts' shadow copies where asked for, and
    the slots. Without a budget, a model that does not fit the room this process has (`room`:
    memory_room(), which sees a memory cgroup's limit) is mapped whole where the room holds
    MAPPED_SHARE of it, else gets UNASKED_SHARE of the room; the note says which."""
    if not args.is_moe:
        return None, None
    expert_sizes = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    whole = fixed_memory(manifest, args) + sum(expert_sizes)
    note = None
    if memory is None:
        room = room or memory_room()
        if room is None or whole <= room.available:
            return None, None
        where = (f"{room.available / 1e9:.1f} GB are left under the {room.limit / 1e9:.1f} GB limit of "
                 f"{room.where}" if room.limit else f"{room.available / 1e9:.1f} GB are available")
        if room.available >= MAPPED_SHARE * whole:
            return None, (f"the model needs {whole / 1e9:.1f} GB and {where}: mapped whole, the system pages "
                          f"what does not fit (faster than an expert cache when most fits; --memory sets a budget)")
        budget = int(room.available * UNASKED_SHARE)
        note = (f"the model needs {whole / 1e9:.1f} GB and {where}: running within {budget / 1e9:.1f} GB "
                f"(set it with --memory)")
    else:
        budget = parse_memory(memory)
    if budget >= whole:  # everything fits: no cache, and no shadow copies needed
        return None, note
    fixed = fixed_memory(manifest, args, shadow_bits)
    slots = (budget - fixed) // max(expert_sizes)
    if slots < args.num_experts_per_tok:
        dense = manifest["files"]["dense.bin"]["size"]
        kv_and_runtime = fixed_memory(manifest, args) - dense
        shadows = (f", {shadow_bits}-bit shadow copies {shadow_bytes(manifest, shadow_bits) / 1e9:.2f} GB"
                   if shadow_bits else "")
        raise LocalmixError(f"--memory {budget / 1e9:.2f} GB is too small for this model: it needs at least "
                            f"{minimum_memory(manifest, args, shadow_bits) / 1e9:.2f} GB (dense weights "
                            f"{dense / 1e9:.2f} GB, KV cache and runtime {kv_and_runtime / 1e9:.2f} GB"
                            f"{shadows}, {args.num_experts_per_tok} experts)")
    slots = int(min(slots, len(expert_sizes) - 1))
    if note:
        note += f": {slots} of {len(expert_sizes)} experts in memory, the rest read from disk"
    return slots, note


class KVAllowance:
    """The KV caches' part of a budget: the first room planned for them (fixed_memory); as they
    grow past it, each growth's bytes are taken from the expert slots (`give_up(bytes)`: slots
    retired), so that the process stays within its budget while the context grows. A cache gives
    its bytes back when it is dropped or replaced by a larger one, and what is beyond the planned
    room goes back to the slots (`take_back(bytes)`)."""

    def __init__(self, planned: int, give_up, take_back):
        self.planned, self.free, self.give_up, self.take_back = planned, planned, give_up, take_back

    def take(self, nbytes: int) -> None:
        planned = max(0, min(self.free, nbytes))
        self.free -= planned
        rest = nbytes - planned
        if rest > 0:  # from the slots: a whole slot's surplus stays here, a shortfall is owed (over budget)
            self.free += self.give_up(rest) - rest

    def give_back(self, nbytes: int) -> None:
        self.free += nbytes
        if self.free > self.planned:
            self.free -= self.take_back(self.free - self.planned)
