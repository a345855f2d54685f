"""What run and chat print: the streamed answer, prompt progress and timings."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from localmix.api import Model
from localmix.sampling import SamplingParams

err = Console(stderr=True, highlight=False)


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


def stream_answer(model: Model, prompt, max_tokens: int, params: SamplingParams):
    """Print the answer as it comes; return its text and the last response."""
    parts, last = [], None
    for last in model.stream(prompt, max_tokens, on_prefill=prefill_progress(), **vars(params)):
        parts.append(last.text)
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts), last


class PullProgress:
    """The bars of a pull, one per downloaded file and one for quantization, shown from the first
    update on (a pull that fails before any work prints nothing but its error)."""

    def __init__(self):
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def _update(self, key: str, description: str, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TimeRemainingColumn(), console=err)
            self.progress.start()
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total or None)
        self.progress.update(self.tasks[key], completed=done)

    def download(self, name: str, done: int, total: int) -> None:
        self._update(name, f"download {name} ({total / 1e6:.1f} MB)", done, total)

    def quantize(self, done: int, total: int) -> None:
        self._update("quantize", "quantize", done, total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
