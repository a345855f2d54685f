"""What run and chat print: the streamed answer, prompt progress and timings."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text

from localmix.api import Model
from localmix.sampling import SamplingParams

err = Console(stderr=True, highlight=False, soft_wrap=True)


def prefill_progress():
    """A progress bar for prompt processing, shown once the prompt takes more than one step."""
    state = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            if done >= total:
                return
            state["bar"] = Progress(console=err, transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("processing prompt", total=total)
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            state.pop("bar").stop()

    return update


def print_stats(response, load_s: float, total_s: float) -> None:
    err.print(f"total duration:       {total_s:.3f}s\n"
              f"load duration:        {load_s:.3f}s\n"
              f"prompt eval count:    {response.prompt_tokens} token(s)\n"
              f"prompt eval rate:     {response.prompt_tps:.2f} tokens/s\n"
              f"eval count:           {response.generation_tokens} token(s)\n"
              f"eval rate:            {response.generation_tps:.2f} tokens/s\n"
              f"peak memory:          {response.peak_memory:.2f} GB")


def usage_snapshot(model: Model) -> tuple:
    """What `stats_line` compares with: the expert cache's counters and the routing statistics."""
    return (model.expert_cache.counters() if model.expert_cache else None), model.transformer.routing.snapshot()


def stats_line(model: Model, before: tuple) -> str:
    """One line on the experts since `before`: the cache's figures, how evenly tokens were routed,
    and how often a token reused its predecessor's experts."""
    from localmix.routing import summary
    counters, routing = before
    routing = model.transformer.routing.since(routing)
    parts = []
    if model.expert_cache:
        now = model.expert_cache.counters()
        s = model.expert_cache.stats({key: value - counters[key] for key, value in now.items()})
        guesses = f"prefetch hits {s['prefetch_hit_rate']:.2f}, " if s["expert_prefetch"] else ""
        guesses += f"{s['shadow_uses']} shadow uses, " if s["expert_shadow_bits"] else ""
        parts.append(f"experts: {s['expert_hits'] + s['expert_misses']} lookups, hit rate {s['expert_hit_rate']:.2f}, "
                     f"{guesses}read {s['expert_bytes_read'] / 1e9:.2f} GB, waited {s['stall_s']:.2f} s "
                     f"({s['expert_slots']} slots, {s['expert_policy']})")
    else:
        parts.append("experts: all resident")
    if model.config.is_moe and routing["routed"].any():
        m = summary(routing)
        parts.append(f"busiest expert {m['max_over_mean'].mean():.2f}x the mean load (layer average; worst "
                     f"{m['max_over_mean'].max():.2f}x), {m['experts_per_token'].mean():.2f} experts per token, "
                     f"{m['reuse'].mean():.2f} of them used again by the next token")
    return "; ".join(parts)


def stream_answer(model: Model, prompt, max_tokens: int, params: SamplingParams, cancelled=None, trace=None):
    """Print the answer as it comes; return its text and the last response (finish_reason
    "cancelled" once cancelled() said so: see interrupts.CtrlC). trace: gets its routing records
    (--trace: a routing.TraceFile)."""
    parts, last = [], None
    for last in model.stream(prompt, max_tokens, on_prefill=prefill_progress(), cancelled=cancelled, trace=trace,
                             **vars(params)):
        parts.append(last.text)
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts), last


class OnlyForBytes(ProgressColumn):
    """A column shown for byte-counting tasks (downloads) and left blank for the others."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task):
        return self.column.render(task) if task.fields.get("bytes") else Text("")


class PullProgress:
    """The bars of a pull, one per downloaded file and one for quantization, shown from the first
    update on (a pull that fails before any work prints nothing but its error)."""

    def __init__(self):
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def _update(self, key: str, description: str, done: int, total: int, is_bytes: bool) -> None:
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                     OnlyForBytes(DownloadColumn()), OnlyForBytes(TransferSpeedColumn()),
                                     TimeRemainingColumn(), console=err)
            self.progress.start()
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total or None, bytes=is_bytes)
        self.progress.update(self.tasks[key], completed=done)

    def download(self, name: str, done: int, total: int) -> None:
        self._update(name, f"download {name}", done, total, True)

    def write(self, name: str, done: int, total: int) -> None:
        self._update(name, f"write {name}", done, total, True)

    def quantize(self, done: int, total: int) -> None:
        self._update("quantize", "quantize", done, total, False)

    def step(self, what: str, done: int, total: int) -> None:
        self._update(what, what, done, total, False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
