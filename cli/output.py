"""What run and chat print: the streamed answer, prompt progress and timings."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

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


def bytes_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


def rich_tqdm(progress: Progress):
    """A stand-in for tqdm that huggingface_hub drives, drawing its bars with rich instead."""

    class RichBar:
        def __init__(self, *args, total=None, initial=0, desc="", **kwargs):
            self.task = progress.add_task(f"download {desc}", total=total, completed=initial)

        def update(self, n=1):
            progress.advance(self.task, n)

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    return RichBar
