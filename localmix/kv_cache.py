"""Keys and values of the tokens seen so far, one preallocated buffer per layer."""

from __future__ import annotations

import numpy as np

from localmix.config import ModelArgs
from localmix.errors import LocalmixError

KV_DTYPES = {"f32": np.float32, "f16": np.float16}


class KVCache:
    """Keys and values, [layers, capacity, kv_heads, head_dim] each (position-major, so that the
    stored tokens of a layer are one contiguous block), float32 (the default: exact) or float16
    (half the memory: 32 layers x 8 heads x 128 x 2 x 2 bytes = 128 KiB per token of Mixtral 8x7B
    context instead of 256 KiB).

    `reserve` grows the buffers, doubling up to the context, as the tokens come: an answer starts
    with room for its prompt and a few hundred tokens (generate.FIRST_KV_ROOM) rather than for
    prompt + max_tokens, so a long max_tokens costs memory only as far as the answer really goes.
    Growing copies the stored tokens into the larger buffers; views handed out by `update` are of
    the current buffers only, so readers (attention, the Numba kernels) always see the copied ones.
    """

    def __init__(self, args: ModelArgs, capacity: int = 256, dtype=np.float32, allowance=None):
        """allowance: within a memory budget, the KV caches' part of it (experts.budget.KVAllowance):
        each growth takes its bytes from it, and the cache gives them back when it goes."""
        self.allowance = allowance  # first: __del__ reads it whatever fails below
        self.max_length = args.max_position_embeddings
        self.layers, self.heads, self.head_dim = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.dtype = np.dtype(dtype)
        self.keys = self.values = np.zeros((self.layers, 0, self.heads, self.head_dim), self.dtype)
        self.length = 0  # tokens stored in every layer
        self.reserve(capacity)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def reserve(self, length: int) -> None:
        if length > self.max_length:
            raise LocalmixError(f"context full: {length} tokens exceed the model's "
                                f"{self.max_length}-token context")
        if length <= self.capacity:
            return
        capacity = min(max(length, 2 * self.capacity), self.max_length)
        old_bytes = self.keys.nbytes + self.values.nbytes
        if self.allowance is not None:  # the new buffers, while the old ones are still held
            self.allowance.take(2 * self.layers * capacity * self.heads * self.head_dim * self.dtype.itemsize)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = np.zeros((self.layers, capacity, self.heads, self.head_dim), self.dtype)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)
        if self.allowance is not None:
            self.allowance.give_back(old_bytes)

    def __del__(self):
        if self.allowance is not None:
            self.allowance.give_back(self.keys.nbytes + self.values.nbytes)

    def update(self, layer: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store the new tokens' keys and values ([T, kv_heads, head_dim]) after the cached ones and
        return views of all of them ([length, kv_heads, head_dim]). `advance` moves the length on
        once every layer has stored."""
        end = self.length + keys.shape[0]
        self.keys[layer, self.length:end] = keys
        self.values[layer, self.length:end] = values
        return self.keys[layer, :end], self.values[layer, :end]

    def advance(self, count: int) -> None:
        self.length += count

    def reset(self) -> None:
        self.length = 0
