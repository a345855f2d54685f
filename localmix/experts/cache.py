"""Experts kept within a memory budget: preallocated slots, filled from the expert files on demand.

A localmix model keeps each expert in its own file (w1, w2, w3). Within a budget the dense weights
stay resident, and the experts live in slots, one expert each: a miss reads the expert's file
straight into a free slot (`pread`, no intermediate copy and no memory map that the kernel would
count against the process), evicting one chosen by the policy. The slot holds the file's bytes
exactly, so the products, and the logits, are bit for bit those of the resident model.

The budget is in bytes: `slots` largest experts' worth. Where the experts differ in size (a model
`localmix shrink` made, with experts at 2, 3 and 4 bits) there are more slots than that, each on pages
of its own, and the cache counts the pages its slots hold: a small expert takes only its own
pages (a larger one's tail is given back), so more small experts stay resident in the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from localmix.errors import LocalmixError
from localmix.experts.policies import POLICIES, Pinned
from localmix.experts.reads import read_into
from localmix.experts.shadows import shadow_matrix
from localmix.experts.source import ExpertSource
from localmix.model import Expert, expert_activation
from localmix.store import ModelFolder, QuantizedMatrix, TensorLayout, align, expert_matrix


RELEASE = getattr(mmap, "MADV_DONTNEED", None)  # gives a retired slot's pages back (Linux, macOS)
READERS = 2  # a decoded token's misses read at once, one per thread: 2 in flight read as fast as more here


def page_rows(rows: int, row_bytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """[rows, row_bytes rounded up to pages] bytes of anonymous memory, each row on pages of its
    own (taken as it is written, given back with madvise), and the map that holds them. Private:
    a shared anonymous map is shared memory, whose pages madvise does not free."""
    stride = align(row_bytes, mmap.PAGESIZE)
    region = mmap.mmap(-1, rows * stride, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, np.frombuffer(region, np.uint8).reshape(rows, stride)


class ExpertCache:
    """Slots for `slots` experts of a model folder, with counters. Reads happen in the caller's
    thread on a miss, or ahead of time in one background thread (`prefetch`); a lock guards the
    bookkeeping, and a failed background read is raised in the caller's thread."""

    def __init__(self, model: ModelFolder, layers: int, experts: int, slots: int, policy: str = "lfu",
                 hot: list[tuple[int, int]] = (), experts_per_token: int = 2, prefetch: bool = True,
                 allocate=None, shadow_bits: int = 0, on_progress=None, routers=()):
        """model: the model folder, its manifest checked when it was opened. hot: for the "pinned" policy, experts hottest first; as many as leave a quarter of the
        slots (at least two tokens' experts) to the others are read in at the start and kept.
        prefetch: guess the next layer's experts and read them in the background (`speculate`).
        allocate(shape): the slots' uint8 buffer (a backend's memory, such as MLX's), or None where the
        backend has none of its own (see Ops.allocate_slots); numpy's by default.
        shadow_bits: keep a copy of every expert at this many bits (2) beside the slots: a decoded
        token whose expert is not in a slot uses the copy at once, and the full expert is read in
        the background for the tokens after (see token_experts). on_progress(done, total): while
        the copies are made. routers: each layer's (router, its bias or None), (None, None) for a
        dense layer: what `speculate` guesses the next layer's experts with."""
        if policy not in POLICIES:
            raise LocalmixError(f"unknown expert cache policy {policy!r}: use {' or '.join(POLICIES)}")
        pinned = list(hot)[:max(0, slots - max(2 * experts_per_token, slots // 4))] if policy == "pinned" else []
        self.folder, self.policy = model.folder, Pinned(pinned) if policy == "pinned" else POLICIES[policy]()
        self.policy_name, self.guess_ahead = policy, prefetch
        # Every shape, offset and size below sizes a slot, a read or a view the kernels write through:
        # they come from the manifest as check_manifest checked it against the config and the layout rule
        # when the folder was opened (ModelFolder.layouts).
        self.layouts: dict[tuple[int, int], list[TensorLayout]] = {}
        for name, layout in model.layouts.items():
            matrix = expert_matrix(name)
            if matrix:
                self.layouts.setdefault(matrix[:2], []).append(layout)
        expected = len(model.config.moe_layers) * experts
        if len(self.layouts) != expected:
            raise LocalmixError(f"{self.folder}: the manifest lists {len(self.layouts)} experts, "
                                f"expected {expected}; pull the model again")
        self.file_bytes = {key: model.manifest["files"][ls[0].file]["size"] for key, ls in self.layouts.items()}
        self.slot_bytes = max(self.file_bytes.values())
        self.glu = expert_activation(model.config)  # the experts' activation, where not plain SwiGLU
        # the budget: `slots` largest experts (fewer while a growing KV cache has some, see give_up)
        self.slots, self.initial_slots = slots, slots
        self.least_slots = min(slots, len(pinned) + max(2, experts_per_token))
        buffer = allocate((slots, self.slot_bytes)) if allocate else None
        self.region = None  # the slots' own anonymous memory, where the backend has none (see give_up)
        if buffer is None:  # each slot on pages of its own, taken as it is written, given back by _release
            smallest = min(self.file_bytes.values())
            rows = min(len(self.layouts), slots * self.slot_bytes // smallest) if smallest < self.slot_bytes else slots
            self.region, buffer = page_rows(rows, self.slot_bytes)
        self.buffer = buffer
        self.held = [0] * len(buffer)  # bytes of each slot's pages in use (what the budget counts)
        self.held_total = 0  # their sum, kept as they change (asked at every miss)
        self.resident: dict[tuple[int, int], tuple[int, Expert]] = {}  # key -> (slot, expert views)
        self.free = list(range(len(buffer) - 1, -1, -1))
        self.in_use: set = set()  # the experts of the batch being computed: never evicted
        self.loading: dict = {}   # key -> Future of a background read
        self.prefetched: set = set()  # brought in ahead of time and not asked for yet
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="localmix-prefetch")
        self.readers = ThreadPoolExecutor(READERS, thread_name_prefix="localmix-read")  # a token's misses
        self.failure: BaseException | None = None
        # Counters per layer and expert: lookups that found the expert resident (hits), had to
        # read it (misses), found it brought in by a guess (prefetch hits); and in all.
        self.hits, self.misses, self.prefetch_hits = (np.zeros((layers, experts), np.int64) for _ in range(3))
        self.bytes_read = self.prefetches = 0
        self.stall_s = 0.0  # time the model waited for reads
        self.routers = list(routers)
        self.shadow_bits, self.shadows = shadow_bits, {}
        self.shadow_uses = np.zeros((layers, experts), np.int64)  # misses answered by a shadow copy
        if shadow_bits:
            self._make_shadows(shadow_bits, on_progress)
        with self.lock:
            for key in pinned:
                self._start_load(key, self._take_slot(self.file_bytes[key]))

    @property
    def shapes(self) -> set[tuple[int, int]]:
        """The (bits, group size) pairs of the experts' matrices."""
        return {(t.bits, t.group_size) for layouts in self.layouts.values() for t in layouts if t.bits}

    @functools.cached_property
    def on_vector_kernels(self) -> bool:
        """Whether the vector kernels take every expert matrix (see ExpertSource.on_vector_kernels).
        Found once: asked at every layer of every token."""
        from localmix.kernels import runs_vector
        matrices = [t for ts in self.layouts.values() for t in ts if expert_matrix(t.name)[2] in ("w1", "w2", "w3")]
        return all(t.bits and runs_vector(t.bits, t.group_size, t.shape[1]) for t in matrices)

    def get(self, layer: int, expert: int) -> Expert:
        key = (layer, expert)
        self._raise_failure()
        start = time.perf_counter()
        with self.lock:
            self.policy.used(key)
            loading = self.loading.get(key)
        if loading is not None:
            loading.exception()  # wait; a failure is raised below
            self._raise_failure()
        with self.lock:
            if key in self.resident:
                self.hits[key] += 1
                if key in self.prefetched:
                    self.prefetch_hits[key] += 1
                    self.prefetched.discard(key)
                self.stall_s += time.perf_counter() - start
                return self.resident[key][1]
            self.misses[key] += 1
            slot = self._take_slot(self.file_bytes[key])
        while slot is None:  # every other slot is being filled in the background: wait for one
            with self.lock:
                waiting = list(self.loading.values())
            if not waiting:
                raise LocalmixError("expert cache: no slot free for an expert (more experts at once than slots)")
            waiting[0].exception()
            with self.lock:
                slot = self._take_slot(self.file_bytes[key])
        views = self._read(key, slot, parallel=True)
        with self.lock:
            self.resident[key] = (slot, views)
        self.stall_s += time.perf_counter() - start
        return views

    def token_groups(self, layer: int, experts) -> Iterator[tuple[list[int], list[Expert]]]:
        """One decoded token's experts as groups computed in turn: those in slots first, while the
        others are read, each by a reader thread (past the GIL, waiting on the disk, not on the
        cores: the kernels keep both), then those others once read. The reads start here, before
        the first group is computed. With shadow copies, one group (token_experts)."""
        if self.shadows:
            return iter([(list(map(int, experts)), self.token_experts(layer, experts))])
        self._raise_failure()
        keys = [(layer, int(e)) for e in experts]
        started = {}
        with self.lock:
            self.in_use = set(keys)
            for key in keys:
                if key in self.resident or key in self.loading:
                    continue
                slot = self._take_slot(self.file_bytes[key])
                if slot is None:  # every free slot is being filled: get() waits for one
                    continue
                self.policy.used(key)
                self.misses[key] += 1
                self.loading[key] = started[key] = self.readers.submit(self._load, key, slot, False, True)
            ready = [key for key in keys if key in self.resident]
        return self._token_groups(ready, [key for key in keys if key not in ready], started)

    def _token_groups(self, ready, later, started) -> Iterator[tuple[list[int], list[Expert]]]:
        if ready:
            yield [e for _, e in ready], [self.get(*key) for key in ready]
        if later:
            yield [e for _, e in later], [self._wait(key, started[key]) if key in started else self.get(*key)
                                          for key in later]

    def _wait(self, key, loading) -> Expert:
        """A miss token_groups started reading: its expert, once read (its read's failure raised
        here, and only here: a token whose other reads failed too leaves them in their futures, and
        those experts are read again when next asked for)."""
        start = time.perf_counter()
        try:
            loading.result()
        finally:
            self.stall_s += time.perf_counter() - start
        with self.lock:
            return self.resident[key][1]

    def token_experts(self, layer: int, experts) -> list[Expert]:
        """One decoded token's experts: those in slots, and for the others their shadow copies,
        whose full experts are read in the background for the tokens that follow (as HOBBIT
        does), one at a time: the token does not wait for the disk. Without shadows, batch()."""
        if not self.shadows:
            return self.batch(layer, experts)
        self._raise_failure()
        keys = [(layer, int(e)) for e in experts]
        with self.lock:
            self.in_use = set(keys)
            missing = [key for key in keys if key not in self.resident]
            for key in missing:
                self.policy.used(key)
                self.misses[key] += 1
                self.shadow_uses[key] += 1
                if not self.loading:  # one read at a time: queued, they took the kernels' time
                    slot = self._take_slot(self.file_bytes[key])
                    if slot is not None:
                        self._start_load(key, slot)
        return [self.shadows[key] if key in missing else self.get(*key) for key in keys]

    def _make_shadows(self, bits: int, on_progress=None) -> None:
        """Every expert read through the last slot (empty yet) and quantized again at `bits`."""
        from localmix.kernels import has_vector_kernels
        widths = {t.shape[1] for layouts in self.layouts.values() for t in layouts if t.bits}
        if not has_vector_kernels() or not self.on_vector_kernels or any(width % 128 for width in widths):
            raise LocalmixError("shadow copies need the experts' widths to be multiples of 128 (the 2-bit "
                                "kernels' unit) on a CPU with AVX2")
        for i, key in enumerate(sorted(self.layouts)):
            full = self._read(key, self.free[0])
            biases = {part: np.array(b) for part, b in (("b1", full.b1), ("b2", full.b2), ("b3", full.b3))
                      if b is not None}  # copied out of the slot, which will hold other experts
            self.shadows[key] = dataclasses.replace(
                full, w1=shadow_matrix(full.w1, bits), w2=shadow_matrix(full.w2, bits), w3=shadow_matrix(full.w3, bits),
                **biases)
            if on_progress:
                on_progress(i + 1, len(self.layouts))
        self._hold(self.free[0], self.slot_bytes)
        self._release(self.free[0], 0)  # its pages back: the slots' budget starts empty
        self.bytes_read = 0

    @property
    def shadow_bytes(self) -> int:
        return sum(m.words.nbytes + m.scales.nbytes + m.biases.nbytes
                   for e in self.shadows.values() for m in (e.w1, e.w2, e.w3))

    def batch(self, layer: int, experts) -> list[Expert]:
        """Experts that must be resident together (at most `slots` of them)."""
        with self.lock:
            self.in_use = {(layer, int(e)) for e in experts}
        return [self.get(layer, int(e)) for e in experts]

    def prefetch(self, layer: int, experts) -> None:
        """Start reading these experts in the background thread, where not there already."""
        with self.lock:
            for e in experts:
                key = (layer, int(e))
                if key in self.resident or key in self.loading:
                    continue
                slot = self._take_slot(self.file_bytes[key])
                if slot is None:
                    return
                self._start_load(key, slot, guess=True)
                self.prefetches += 1

    def speculate(self, layer: int, h: np.ndarray, k: int) -> None:
        """Guess the next layer's k experts (the call's experts per token) from this layer's normed
        hidden state and the next layer's router (as Eliseev and Mazur do), and prefetch them: a
        wrong guess costs reads, never correctness."""
        if not (self.guess_ahead and layer + 1 < len(self.routers) and self.routers[layer + 1][0] is not None):
            return
        router, bias = self.routers[layer + 1]
        from localmix.kernels import route_tokens
        bias = np.zeros(len(router), np.float32) if bias is None else np.asarray(bias, np.float32)
        chosen = route_tokens(np.ascontiguousarray(h, np.float32), router, k, False, bias)[0][0]
        self.prefetch(layer + 1, chosen)

    def _start_load(self, key, slot: int, guess: bool = False) -> None:
        """Read an expert into a slot in the background thread. Called with the lock held."""
        self.loading[key] = self.pool.submit(self._load, key, slot, guess)

    def _load(self, key, slot: int, guess: bool, waited_for: bool = False) -> None:  # in a background thread
        """waited_for: a token's miss (token_groups), whose own future its token waits on: a failure
        is raised there. Otherwise (a prefetch) it is kept for the next lookup to raise."""
        try:
            views = self._read(key, slot)
        except BaseException as e:
            with self.lock:
                self.loading.pop(key, None)
                self.free.append(slot)
                if not waited_for:
                    self.failure = e
            if waited_for:
                raise
            return
        with self.lock:
            self.loading.pop(key, None)
            self.resident[key] = (slot, views)
            if guess:
                self.prefetched.add(key)
            self.policy.loaded(key)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _take_slot(self, size: int) -> int | None:
        """A slot for an expert of `size` bytes within the budget: a free one (the one with the most
        pages in use, to reuse them), room made by giving back free slots' pages, then by the
        policy's victims (never an expert of the batch being computed); None if all are being
        filled. Called with the lock held."""
        while True:
            if self.free:
                slot = max(self.free, key=self.held.__getitem__)
                if self.held_total - self.held[slot] + size <= self.slots * self.slot_bytes:
                    self.free.remove(slot)
                    self._release(slot, size)
                    return slot
                spare = [other for other in self.free if other != slot and self.held[other]]
                if spare:
                    self._release(spare[0], 0)
                    continue
            if not self._evict():
                return None

    def _evict(self) -> bool:
        """The policy's victim out (its slot free, its pages kept for the next expert); False if
        there is none. Called with the lock held."""
        victim = self.policy.victim(lambda key: key in self.resident and key not in self.in_use)
        if victim is None:
            return False
        self.policy.removed(victim)
        self.prefetched.discard(victim)
        slot, _ = self.resident.pop(victim)
        self.free.append(slot)
        return True

    def _release(self, slot: int, keep: int) -> None:
        """The slot's pages past its first `keep` bytes given back to the system (numpy's slots; a
        backend's own memory stays allocated, only counted as free)."""
        keep = align(keep, mmap.PAGESIZE)
        if self.held[slot] > keep and self.region is not None and RELEASE is not None:
            stride = self.buffer.shape[1]
            self.region.madvise(RELEASE, slot * stride + keep, self.held[slot] - keep)
        self._hold(slot, keep)

    def _hold(self, slot: int, nbytes: int) -> None:
        self.held_total += nbytes - self.held[slot]
        self.held[slot] = nbytes

    def give_up(self, nbytes: int) -> int:
        """Lower the budget by whole largest experts until `nbytes` are freed (a KV cache growing
        past its planned room, see budget.KVAllowance), never below one token's experts: free
        slots' pages go first, then the policy's victims' (never the experts being computed).
        Returns the bytes freed."""
        freed = 0
        with self.lock:
            while freed < nbytes and self.slots > self.least_slots:
                self.slots -= 1
                freed += self.slot_bytes
            while self.held_total > self.slots * self.slot_bytes:
                spare = [slot for slot in self.free if self.held[slot]]
                if spare:
                    self._release(spare[0], 0)
                elif not self._evict():
                    break  # the rest is in use or being read: its pages go when it is evicted
        return freed

    def take_back(self, nbytes: int) -> int:
        """The budget given up by give_up back, as many largest experts as `nbytes` hold (a KV cache
        that went and left its bytes); returns the bytes taken."""
        taken = 0
        with self.lock:
            while self.slots < self.initial_slots and taken + self.slot_bytes <= nbytes:
                self.slots += 1
                taken += self.slot_bytes
        return taken

    def _read(self, key, slot: int, parallel: bool = False) -> Expert:
        """Read an expert's file into a slot (see read_into) and view its matrices there."""
        layouts = self.layouts[key]
        path = self.folder / layouts[0].file
        size = self.file_bytes[key]
        read_into(path, self.buffer[slot], size, parallel)
        with self.lock:
            self.bytes_read += size
        data = self.buffer[slot]
        matrices = {}
        for layout in layouts:
            views = {part: data[offset:offset + n] for part, offset, n in layout.parts}
            if layout.bits is None:  # a float32 bias (gpt-oss's experts have them)
                matrices[expert_matrix(layout.name)[2]] = views["data"].view(np.float32).reshape(layout.shape)
                continue
            rows = layout.shape[0]
            matrices[expert_matrix(layout.name)[2]] = QuantizedMatrix(
                views["words"].view(np.uint32).reshape(rows, -1), views["scales"].view(np.float16).reshape(rows, -1),
                views["biases"].view(np.float16).reshape(rows, -1), layout.bits, layout.group_size, str(path),
                transient=True)
        return Expert(**matrices, glu=self.glu)

    def read_bandwidth(self, most_bytes: int = 1 << 30) -> float:
        """GB/s of misses' reads (as `get` reads them: all the kernels' threads, past the page cache
        where it can) of experts spread over the model, into memory of its own (the slots are left
        as they are): what the disk gives this cache, for the limit it sets (bench)."""
        keys = sorted(self.layouts)
        count = max(1, min(len(keys), most_bytes // self.slot_bytes))
        region, buffers = page_rows(1, self.slot_bytes)
        buffer = buffers[0]
        total, start = 0, time.perf_counter()
        for key in keys[::max(1, len(keys) // count)][:count]:
            read_into(self.folder / self.layouts[key][0].file, buffer, self.file_bytes[key], parallel=True)
            total += self.file_bytes[key]
        seconds = time.perf_counter() - start
        del buffer, buffers
        region.close()
        return total / seconds / 1e9

    def counters(self) -> dict:
        """Running totals: lookups that found the expert resident (hits) or read it (misses),
        guesses read ahead (prefetches) and those used (prefetch hits), bytes read, seconds waited.
        Reads still in flight are waited for first, so that bytes read match the reads counted."""
        with self.lock:
            in_flight = list(self.loading.values())
        for future in in_flight:
            future.exception()
        return {"expert_hits": int(self.hits.sum()), "expert_misses": int(self.misses.sum()),
                "shadow_uses": int(self.shadow_uses.sum()),
                "prefetches": self.prefetches, "prefetch_hits": int(self.prefetch_hits.sum()),
                "expert_bytes_read": self.bytes_read, "stall_s": self.stall_s}

    def stats(self, counters: dict | None = None) -> dict:
        """The counters (since the start, or the ones given, such as a difference of two) with
        hit rates and the cache's settings."""
        c = counters or self.counters()
        lookups = c["expert_hits"] + c["expert_misses"]
        return {"expert_policy": self.policy_name, "expert_prefetch": self.guess_ahead, "expert_slots": self.slots,
                "expert_pinned": len(self.policy.pinned), "expert_shadow_bits": self.shadow_bits, **c,
                "expert_hit_rate": c["expert_hits"] / lookups if lookups else 1.0,
                "prefetch_hit_rate": c["prefetch_hits"] / c["prefetches"] if c["prefetches"] else 0.0}


class CachedExperts(ExpertSource):
    """A layer's experts, looked up in the cache when the model asks for one."""

    on_demand = True

    def __init__(self, cache: ExpertCache, layer: int, count: int):
        self.cache, self.layer, self.count = cache, layer, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, expert: int) -> Expert:
        if not 0 <= expert < self.count:
            raise IndexError(expert)
        return self.cache.get(self.layer, int(expert))

    def is_resident(self, expert: int) -> bool:
        return (self.layer, int(expert)) in self.cache.resident

    def on_vector_kernels(self) -> bool:
        return self.cache.on_vector_kernels  # from the manifest: no expert is brought in

    def shapes(self) -> set[tuple[int, int]]:
        return self.cache.shapes

    def expert_bytes(self) -> int:
        return self.cache.slot_bytes

    def speculate(self, h: np.ndarray, k: int) -> None:
        self.cache.speculate(self.layer, h, k)

    def for_token(self, experts) -> Iterator[tuple[list[int], list[Expert]]]:
        """A decoded token's experts, those in slots first while the others are read (shadow copies
        for those not in the cache, where kept)."""
        return self.cache.token_groups(self.layer, experts)

    def batches(self, experts) -> Iterator[tuple[list[int], list[Expert]]]:
        """The experts in groups that fit the slots together (pinned experts have their own), each
        loaded as it is reached."""
        pinned = self.cache.policy.pinned
        room = self.cache.slots - len(pinned)
        part, taking = [], 0
        for e in map(int, experts):
            part.append(e)
            taking += (self.layer, e) not in pinned
            if taking == room:
                yield part, self.cache.batch(self.layer, part)
                part, taking = [], 0
        if part:
            yield part, self.cache.batch(self.layer, part)

