"""The generation loop: prefill the prompt, then sample one token at a time, streaming text."""

from __future__ import annotations

import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from localmix.errors import LocalmixError
from localmix.model import Transformer
from localmix.quality import log_softmax
from localmix.routing import RoutingOptions
from localmix.sampling import Sampler, SamplingParams
from localmix.tokenizer import ModelTokenizer


FIRST_KV_ROOM = 256  # positions an answer's KV cache holds beyond its prompt before it first grows


@dataclass
class GenerationResponse:
    """One step of generation, as mlx-lm's stream_generate reports it."""
    text: str                  # new text: whole characters only (may be empty)
    token: int | None          # the token sampled at this step
    prompt_tokens: int
    prompt_tps: float          # prompt tokens per second of prefill
    generation_tokens: int
    generation_tps: float      # generated tokens per second since the first one
    peak_memory: float         # peak resident memory of the process, GB
    finish_reason: str | None  # None while generating, then "stop", "length" or "cancelled"
    # with Generation(logprobs=k): the token's log-probability under the model (its logits' softmax,
    # before sampling's temperature and penalties, as OpenAI reports them), and the k likeliest
    # tokens' (token, log-probability), likeliest first
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def peak_memory_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)  # bytes on macOS, KiB on Linux


class StopStrings:
    """Holds back text that might be the start of a stop string, and cuts at the first one seen.

    Linear time: each stop string keeps its own Knuth-Morris-Pratt state (how many of its first
    characters the text ends with), so a character costs O(1) per stop string, amortized, however
    long the stop strings are; only the longest partial match is held back (fewer than
    max(len(stop)) characters). Re-searching the held text plus each token for every stop string
    cost O(len(stop)^2) per token: a 2M-character stop string took minutes for two tokens in the
    one engine thread. The cut is at the first stop string to end in the text (at the longest of
    those ending at the same character)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # characters of each stop string the text ends with
        self.held: deque[str] = deque()  # characters not shown yet (a deque: shown from the left in O(1) each)

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        for c in text:
            self.held.append(c)
            found = 0
            for i, (stop, fail) in enumerate(zip(self.stops, self.fail)):
                m = self.matched[i]
                while m and stop[m] != c:
                    m = fail[m - 1]
                if stop[m] == c:
                    m += 1
                if m == len(stop):
                    found = max(found, m)
                    m = fail[m - 1]
                self.matched[i] = m
            if found:
                shown = self.take(len(self.held) - found)
                self.flush()
                return shown, True
        return self.take(len(self.held) - max(self.matched)), False

    def take(self, count: int) -> str:
        return "".join(self.held.popleft() for _ in range(count))

    def flush(self) -> str:
        held = "".join(self.held)
        self.held.clear()
        self.matched = [0] * len(self.stops)
        return held


def _failure(s: str) -> list[int]:
    """KMP's table: fail[i] is the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class Generation:
    """One answer being generated: the prompt's prefill, then one sampled token at a time, with
    stop strings and streamed text. `next()` samples from `logits` and says what came; the caller
    then runs the model on that token (alone, or batched with other answers' tokens, as the
    server does) and sets `logits` again.

    cancelled: asked between prefill chunks and before each token (never inside a model call, so
    compiled code is never interrupted); once it answers True the generation ends with one last
    response whose finish_reason is "cancelled" (no token; its text is what was held back, such as
    a possible start of a stop string). Ctrl-C in the CLI and a client gone from the server use it.

    options: this answer's routing (experts per token, steering, trace), given to each of its model
    calls (None: the transformer's default_routing); the server decodes answers with equal options
    together (Transformer.step)."""

    def __init__(self, transformer: Transformer, tokenizer: ModelTokenizer, prompt: list[int], max_tokens: int = 256,
                 params: SamplingParams | None = None, strip_leading_space: bool = True,
                 cancelled: Callable[[], bool] | None = None, options: RoutingOptions | None = None,
                 logprobs: int | None = None, constraint=None):
        args = transformer.args
        if max_tokens < 0:
            raise LocalmixError(f"max_tokens must be >= 0, got {max_tokens}")
        if not prompt:
            raise LocalmixError("the prompt is empty")
        if len(prompt) >= args.max_position_embeddings:
            raise LocalmixError(f"the prompt has {len(prompt)} tokens, more than the model's context of "
                                f"{args.max_position_embeddings} leaves room for")
        if max(prompt) >= args.vocab_size or min(prompt) < 0:
            raise LocalmixError(f"token ids must be in [0, {args.vocab_size})")
        self.transformer, self.tokenizer, self.prompt, self.max_tokens = transformer, tokenizer, prompt, max_tokens
        self.options = options
        self.logprobs = logprobs  # None: not reported; k: the token's and the k likeliest (GenerationResponse)
        self.constraint = constraint  # a structured.Constraint: the tokens its grammar allows, and no other
        self.sampler = Sampler(params or SamplingParams())
        self.stops = StopStrings(self.sampler.params.stop)
        self.decoder = tokenizer.stream_decoder(strip_leading_space)
        # The KV cache starts with room for the prompt and a few hundred tokens and doubles as the answer
        # grows (KVCache.reserve): reserving prompt + max_tokens up front held a whole context's cache for
        # every answer asked for "as long as it takes", however short it turned out.
        self.cache = transformer.new_cache(min(len(prompt) + max_tokens, len(prompt) + FIRST_KV_ROOM,
                                               args.max_position_embeddings))
        self.history = list(prompt)
        self.logits: np.ndarray | None = None
        self.generated, self.prompt_tps, self.started = 0, 0.0, 0.0
        self.is_cancelled = cancelled or (lambda: False)
        self.cancelled = False  # sticky: once asked to stop, stopped

    def prefill(self, step: int = 256, on_prefill: Callable[[int, int], None] | None = None) -> None:
        """The prompt, in chunks of `step` tokens (bounding the attention scores' memory)."""
        start = time.perf_counter()
        for i in range(0, len(self.prompt), step):
            if self.is_cancelled():
                self.cancelled = True
                break  # next() reports it
            self.logits = self.transformer(self.prompt[i:i + step], self.cache, last_only=True,
                                           options=self.options)[-1]
            if on_prefill:
                on_prefill(min(i + step, len(self.prompt)), len(self.prompt))
        self.prompt_tps = len(self.prompt) / max(time.perf_counter() - start, 1e-9)
        self.started = time.perf_counter()

    def next(self) -> GenerationResponse:
        """The next token and its text; finish_reason is set on the last one."""
        self.cancelled = self.cancelled or self.is_cancelled()
        if self.cancelled:
            text = self.stops.feed(self.decoder.flush())[0] + self.stops.flush()
            return GenerationResponse(text, None, len(self.prompt), self.prompt_tps, self.generated,
                                      self.generated / max(time.perf_counter() - self.started, 1e-9),
                                      peak_memory_gb(), "cancelled")
        if self.max_tokens == 0:
            return GenerationResponse("", None, len(self.prompt), self.prompt_tps, 0, 0.0, peak_memory_gb(), "length")
        scores = log_softmax(self.logits) if self.logprobs is not None else None  # before the sampler sees them
        allowed = self.logits if self.constraint is None else self.constraint.restrict(self.logits)
        token = self.sampler(allowed, self.history)
        if self.constraint is not None:
            self.constraint.accept(token)
        self.history.append(token)
        self.generated += 1
        finish = None
        if token in self.tokenizer.stop_ids:  # EOS, or any of a tokenizer.json model's several
            finish, new_text = "stop", self.decoder.flush()
        else:
            new_text = self.decoder.add(token)
            if self.generated == self.max_tokens or self.cache.length == self.transformer.args.max_position_embeddings:
                finish, new_text = "length", new_text + self.decoder.flush()
        text, stopped = self.stops.feed(new_text)
        if stopped:
            finish = "stop"
        elif finish:
            text += self.stops.flush()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        logprob = top = None
        if scores is not None:
            k = min(self.logprobs, len(scores))
            likeliest = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
            likeliest = likeliest[np.argsort(-scores[likeliest], kind="stable")]
            logprob, top = float(scores[token]), [(int(i), float(scores[i])) for i in likeliest]
        return GenerationResponse(text, token, len(self.prompt), self.prompt_tps, self.generated,
                                  self.generated / elapsed, peak_memory_gb(), finish, logprob, top)


def responses(generation: Generation, prefill_step: int = 256,
              on_prefill: Callable[[int, int], None] | None = None) -> Iterator[GenerationResponse]:
    """A generation's responses, one model call per token (the server instead decodes several
    answers' tokens together: server.Engine)."""
    generation.prefill(prefill_step, on_prefill)
    while True:
        response = generation.next()
        yield response
        if response.finish_reason:
            return
        generation.logits = generation.transformer(np.array([response.token]), generation.cache, last_only=True,
                                                   options=generation.options)[-1]


def decode_together(generations: list[Generation]) -> int:
    """Run the model on each generation's token just sampled (by next()), setting its logits, as the
    server decodes its answers: those with equal routing options in one call (Transformer.step reads
    each weight once for all of them), each other set of options in a call of its own, since a model
    call routes all its rows alike. Returns the most generations decoded in one call."""
    groups: dict[RoutingOptions | None, list[Generation]] = {}
    for generation in generations:
        groups.setdefault(generation.options, []).append(generation)
    for options, group in groups.items():
        logits = group[0].transformer.step([g.history[-1] for g in group], [g.cache for g in group], options)
        for generation, row in zip(group, logits):
            generation.logits = row
    return max(map(len, groups.values()), default=0)
