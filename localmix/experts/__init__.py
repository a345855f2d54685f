"""A layer's experts behind one interface (ExpertSource): all resident, or within a memory budget.

    source    the interface the model and the backends use (ExpertSource)
    resident  every expert in memory (ResidentExperts)
    budget    the room a process has (cgroup limits too), how a budget becomes expert slots
              (plan_memory), what stays resident, and the KV caches' share (KVAllowance)
    policies  which expert leaves a full cache: LRU, LFU, Pinned
    reads     an expert's file read into a slot (pread by the kernels' threads on a miss)
    cache     the slots (ExpertCache) and a layer's view of them, an ExpertSource (CachedExperts)
    shadows   2-bit copies of every expert, answering a miss while the full expert is read
"""

from localmix.experts.budget import (KV_FIRST_TOKENS, RUNTIME_BYTES, KVAllowance, Room, cgroup_room, fixed_memory, kv_bytes,
                                     kv_first_bytes,
                                     memory_room, minimum_memory, parse_memory, plan_memory, runtime_bytes)
from localmix.experts.cache import CachedExperts, ExpertCache
from localmix.experts.policies import LFU, LRU, POLICIES, Pinned
from localmix.experts.resident import ResidentExperts
from localmix.experts.shadows import check_shadow_bits, shadow_bytes
from localmix.experts.source import ExpertSource

__all__ = ["KV_FIRST_TOKENS", "RUNTIME_BYTES", "KVAllowance", "Room", "cgroup_room", "fixed_memory", "kv_bytes", "kv_first_bytes", "memory_room",
           "minimum_memory", "parse_memory", "plan_memory", "runtime_bytes",
           "CachedExperts", "ExpertCache", "LFU", "LRU", "POLICIES", "Pinned", "check_shadow_bits", "shadow_bytes",
           "ExpertSource", "ResidentExperts"]
