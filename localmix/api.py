"""The Python API: load a model, then logits, generate, stream and chat."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np

from localmix import kernels
from localmix.checkpoint import Checkpoint, read_weights
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.experts import (POLICIES, CachedExperts, ExpertCache, KVAllowance, check_shadow_bits, kv_first_bytes,
                              plan_memory)
from localmix.routing import RoutingOptions, Steering, hot_experts, read_routing
from localmix.generate import Generation, GenerationResponse, responses
from localmix.home import resolve_model
from localmix.kv_cache import KV_DTYPES
from localmix.backends import NumbaOps, backend_ops, resolve_backend
from localmix.model import Ops, Transformer
from localmix.sampling import SamplingParams
from localmix.store import ModelFolder, is_localmix_model, is_quantized
from localmix.threads import ThreadTuner, use_threads
from localmix.tokenizer import load_tokenizer
from localmix.tools import read_tools


def quantized_shapes(weights) -> set[tuple[int, int]]:
    """The (bits, group size) pairs of a model's quantized matrices."""
    matrices = [weights.embed, weights.lm_head]
    shapes = set()
    for layer in weights.layers:
        matrices += [layer.wq, layer.wk, layer.wv, layer.wo]
        shapes |= layer.experts.shapes()  # an expert cache's from its manifest, without reading them
        if layer.shared_expert is not None:
            matrices += [layer.shared_expert.w1, layer.shared_expert.w2, layer.shared_expert.w3]
    return shapes | {(m.bits, m.group_size) for m in matrices if is_quantized(m)}


class Model:
    """A loaded model with its tokenizer.

    A prompt is either text (completed as it stands, after a BOS token), a list of token ids (used
    as they are), or a list of chat messages ({"role": "system"|"user"|"assistant", "content": str})
    that the model's chat template turns into ids. Sampling settings are those of SamplingParams:
    temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop.
    """

    def __init__(self, folder: str | os.PathLike, experts_per_token: int | None = None, backend: str = "auto",
                 threads: int | None = None, kv_cache: str = "f32", memory: str | int | None = None,
                 expert_policy: str = "lfu", prefetch: bool | None = None, min_expert_weight: float = 0.0,
                 fallback_margin: float = 0.0, shadow_bits: int = 0, on_progress=None):
        """Open a localmix model folder (quantized, from `localmix pull`) or a Hugging Face one.
        backend: "auto" (MLX on Apple Silicon where installed, else Numba), "numba" (CPU kernels),
        "mlx" (float16) or "mlx-f32", or "numpy" (the reference), for a localmix model.
        threads: for the kernels (default: the physical cores). kv_cache: "f32" or "f16".
        memory: a budget such as "12GB" for a localmix model: the experts that do not fit stay on
        disk and come in through an expert cache (policy "lfu", the default: the least often used
        expert goes first; "lru"; or "pinned": the hottest experts of the model's saved routing
        statistics stay, see `localmix stats --save`);
        without one, a model larger than the available memory gets a budget chosen for it (see
        memory_note). prefetch: read the experts that the next layer will probably want while
        this one computes (a wrong guess costs reads, never correctness); by default only where
        the CPU has a core beyond the kernels' threads for it (on 2 cores the reads took the
        kernels' time and prefetch made decoding slower, see README).
        min_expert_weight, fallback_margin: approximate routing, off by default (localmix.routing);
        these and experts_per_token can also be set per call of stream/generate/chat.
        shadow_bits: under a budget, also keep every expert at 2 bits (within the budget) and decode
        with that copy where the expert is not in the cache, while the full one is read for later
        tokens (approximate, Numba backend; 0: exact). on_progress(done, total): while the
        copies are made at load."""
        if kv_cache not in KV_DTYPES:
            raise LocalmixError(f"unknown KV cache type {kv_cache!r}: use {' or '.join(KV_DTYPES)}")
        if expert_policy not in POLICIES:
            raise LocalmixError(f"unknown expert cache policy {expert_policy!r}: use {', '.join(POLICIES)}")
        # Float checkpoints always run the reference: they are what the quantized paths are checked against.
        quantized = is_localmix_model(folder)
        ops = backend_ops(backend)  # checks the name, also for float checkpoints
        if not quantized:
            ops = Ops()
        self.backend = resolve_backend(backend) if quantized else "numpy"
        self.threads = use_threads(threads, isinstance(ops, NumbaOps))
        # Unless the user chose a count: all the cores, or one fewer while another process takes one.
        self.tuner = ThreadTuner(self.threads, fixed=threads is not None or not isinstance(ops, NumbaOps))
        checkpoint = ModelFolder(folder) if quantized else Checkpoint(folder)
        self.path = checkpoint.folder
        # A base model (trained on plain text, such as the demo) continues a prompt rather than answering a chat.
        self.base_model = quantized and checkpoint.manifest["config"].get("localmix_base_model") is True
        self.config: ModelArgs = checkpoint.config.with_experts_per_token(experts_per_token)
        self.expert_cache, self.memory_note = None, None
        slots = None
        if check_shadow_bits(shadow_bits) and not isinstance(ops, NumbaOps):
            raise LocalmixError("shadow copies of experts run on the numba backend (--backend numba)")
        if quantized:
            slots, self.memory_note = plan_memory(checkpoint.manifest, self.config, memory, shadow_bits)
            if shadow_bits and slots is None:
                self.memory_note = "the whole model is resident: no shadow copies needed"
        elif memory is not None:
            raise LocalmixError("--memory applies to localmix models (from `localmix pull`), not to float checkpoints")
        self.tokenizer = load_tokenizer(checkpoint.folder, self.config.vocab_size, files=checkpoint.tokenizer_files)
        # A tokenizer without a chat template (a tokenizer.json with none) is a base model's.
        self.base_model = self.base_model or not self.tokenizer.has_chat_template
        weights = read_weights(checkpoint, self.config, experts=slots is None)
        if slots is not None:
            shape = (self.config.num_hidden_layers, self.config.num_local_experts)
            hot = hot_experts(read_routing(checkpoint.folder, shape), slots) if expert_policy == "pinned" else ()
            if prefetch is None:
                prefetch = (os.cpu_count() or 1) > self.threads
            self.expert_cache = ExpertCache(checkpoint, *shape, slots, expert_policy,
                                            hot, self.config.num_experts_per_tok, prefetch,
                                            ops.allocate_slots, shadow_bits, on_progress,
                                            routers=[(layer.router, layer.router_bias) for layer in weights.layers])
            for i in self.config.moe_layers:
                weights.layers[i].experts = CachedExperts(self.expert_cache, i, self.config.num_local_experts)
        # The routing of a call that sets none of its own (a call's settings are arguments, never state it sets).
        routing = RoutingOptions(self.config.num_experts_per_tok, Steering(min_expert_weight, fallback_margin).check())
        # Within a budget the KV caches' growth past their planned room takes expert slots' memory.
        allowance = (KVAllowance(kv_first_bytes(self.config), self.expert_cache.give_up,
                                 self.expert_cache.take_back)
                     if self.expert_cache else None)
        self.transformer = Transformer(self.config, weights, ops, KV_DTYPES[kv_cache], routing, allowance)
        # Compile the kernels now (or load them from Numba's cache), not in the middle of the first answer.
        self.compile_s = 0.0
        if isinstance(ops, NumbaOps):
            start = time.perf_counter()
            kernels.warm_up(quantized_shapes(self.transformer.weights))
            if self.expert_cache is None:  # and a decoded token's fused kernels (with a cache it would read experts)
                self.transformer([self.tokenizer.bos_id or 0], self.transformer.new_cache(1))
                self.transformer.routing.reset()
            self.compile_s = time.perf_counter() - start

    def logits(self, ids) -> np.ndarray:
        """Float32 logits [len(ids), vocab] of one pass over the ids, from an empty context."""
        ids = list(ids)
        return self.transformer(np.asarray(ids, dtype=np.int64), self.transformer.new_cache(len(ids)))

    def encode_prompt(self, prompt, tools: list[dict] | None = None) -> tuple[list[int], bool]:
        """(ids, whether the answer starts a new text), for the three kinds of prompt. A base model
        has no chat template: it continues the messages' text (see base_text). tools: offered to a
        chat (tools.read_tools' form), where the model's chat format has tools (tokenizer.tool_syntax)."""
        if tools and (isinstance(prompt, str) or self.base_model):
            raise LocalmixError("tools need a chat (messages) and a model whose chat format has tools")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True), False
        prompt = list(prompt)
        if prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            return [int(t) for t in prompt], False
        if self.base_model:
            return self.tokenizer.encode(base_text(prompt), bos=True), False
        return self.tokenizer.apply_chat_template(prompt, read_tools(tools) if tools else None), True

    def routing_options(self, experts_per_token: int | None = None, min_expert_weight: float | None = None,
                        fallback_margin: float | None = None, trace=None) -> RoutingOptions:
        """A call's routing, checked: the model's as loaded, with what the call sets. trace: called
        with each model call's routing records (see routing.trace_records), e.g. a routing.TraceFile."""
        default = self.transformer.default_routing
        k, steering = default.experts_per_token, default.steering
        if experts_per_token is not None:  # checked against the model; its config stays as it is
            k = self.config.with_experts_per_token(experts_per_token).num_experts_per_tok
        steering = Steering(steering.min_weight if min_expert_weight is None else min_expert_weight,
                            steering.fallback_margin if fallback_margin is None else fallback_margin).check()
        return RoutingOptions(k, steering, trace)

    def start(self, ids: list[int], max_tokens: int = 256, params: SamplingParams | None = None,
              options: RoutingOptions | None = None, new_text: bool = False, cancelled=None,
              logprobs: int | None = None, constraint=None) -> Generation:
        """An answer to the prompt's ids (see encode_prompt), not yet prefilled, routed by `options`
        (default: the model's): how every answer starts, one at a time in `stream`, or decoded
        together with others by the server."""
        return Generation(self.transformer, self.tokenizer, ids, max_tokens, params, strip_leading_space=new_text,
                          cancelled=cancelled, options=options, logprobs=logprobs, constraint=constraint)

    def stream(self, prompt, max_tokens: int = 256, on_prefill=None, experts_per_token: int | None = None,
               min_expert_weight: float | None = None, fallback_margin: float | None = None, trace=None,
               cancelled=None, **sampling) -> Iterator[GenerationResponse]:
        """Generate, one response per token. experts_per_token, min_expert_weight, fallback_margin:
        routing for this call only (default: the model's). trace: called with each model call's
        routing records (see routing.trace_records), e.g. a routing.TraceFile. cancelled(): asked
        between model calls; once it returns True the last response has finish_reason "cancelled".
        Streams may interleave: each keeps its own settings."""
        ids, new_text = self.encode_prompt(prompt)
        options = self.routing_options(experts_per_token, min_expert_weight, fallback_margin, trace)
        generation = self.start(ids, max_tokens, SamplingParams(**sampling), options, new_text, cancelled)
        return self.tuner.timed(responses(generation, on_prefill=on_prefill))

    def generate(self, prompt, max_tokens: int = 256, **sampling) -> str:
        return "".join(r.text for r in self.stream(prompt, max_tokens, **sampling))

    def chat(self, messages: list[dict], max_tokens: int = 256, **sampling) -> str:
        """The assistant's answer to a conversation; from a base model, the continuation of its
        text (see base_text)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.generate(list(messages), max_tokens, **sampling)


def base_text(messages: list[dict]) -> str:
    """What a base model (trained on plain text, no chat template) continues for a conversation:
    the messages' texts in order, one paragraph each (as the server gives a base model), so that
    what the system and the earlier turns said is kept, as in a plain-text transcript."""
    texts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise LocalmixError("each message must be a dict with a string \"content\"")
        if m["content"]:
            texts.append(m["content"])
    return "\n\n".join(texts)


def load(path_or_name: str | os.PathLike, experts_per_token: int | None = None, backend: str = "auto",
         threads: int | None = None, kv_cache: str = "f32", memory: str | int | None = None,
         expert_policy: str = "lfu", prefetch: bool | None = None, min_expert_weight: float = 0.0,
         fallback_margin: float = 0.0, shadow_bits: int = 0, on_progress=None) -> Model:
    """Load a model by name from $LOCALMIX_HOME/models, or a localmix or Hugging Face folder."""
    return Model(resolve_model(path_or_name), experts_per_token, backend, threads, kv_cache, memory, expert_policy,
                 prefetch, min_expert_weight, fallback_margin, shadow_bits, on_progress)
