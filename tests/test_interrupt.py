"""Ctrl-C, as a user presses it: `localmix run` and `localmix chat` as real processes (chat on a
pseudo-terminal, where input() goes through readline as it does for a user), SIGINT at varied
moments. Before the fix about half of the interrupts during decoding ended in `SystemError:
CPUDispatcher(...) returned a result with an exception set`, so several tries are made."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

LONG = ["-n", "1000", "--seed", "1"]  # the demo decodes for several seconds: still going when interrupted


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localmix", *args], cwd="/", **kwargs)


def wait_for_bytes(stream, count: int, timeout: float = 60) -> bytes:
    """At least `count` bytes from a pipe or pty, as they come."""
    data, deadline = b"", time.monotonic() + timeout
    fd = stream if isinstance(stream, int) else stream.fileno()
    while len(data) < count:
        assert time.monotonic() < deadline, f"no output after {timeout} s: {data!r}"
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"the process ended: {data!r}"
            data += chunk
    return data


def assert_ended_by_ctrl_c(process: subprocess.Popen, starting: bool = False) -> str:
    """Exit 130 and no traceback. starting: the interrupt may fall while Python itself starts, before
    any of localmix runs; Python's default then ends the process by the signal (-SIGINT here), which a
    shell reports as 130 too, and it must print nothing."""
    _, stderr = process.communicate(timeout=60)
    stderr = stderr.decode()
    if starting and process.returncode == -signal.SIGINT:
        assert stderr.strip() == "", stderr
        return stderr
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    return stderr


@pytest.mark.parametrize("after", [0.0, 0.1, 0.3])
def test_ctrl_c_while_run_decodes(after):
    process = start("run", "demo", "Once upon a time", *LONG, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_bytes(process.stdout, 20)  # the answer is streaming
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    assert_ended_by_ctrl_c(process, starting=True)


@pytest.mark.parametrize("after", [0.3, 0.9, 1.5])
def test_ctrl_c_while_run_starts(after):
    """Importing, loading the model, compiling or loading the kernels: wherever it falls."""
    process = start("run", "demo", "Once upon a time", *LONG, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    assert_ended_by_ctrl_c(process, starting=True)


class Terminal:
    """`localmix chat demo` on a pseudo-terminal."""

    def __init__(self):
        self.master, slave = pty.openpty()
        self.process = start("chat", "demo", "--seed", "1", stdin=slave, stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        self.screen = b""

    def read_until(self, text: bytes, timeout: float = 60) -> bytes:
        """The output up to `text`'s next appearance, which is consumed."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s: {self.screen[-500:]!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:  # the process is gone
                    raise AssertionError(f"chat ended: {self.screen[-500:]!r} {self.process.stderr.read()!r}")
        before, _, self.screen = self.screen.partition(text)
        return before

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")


@pytest.fixture
def terminal():
    term = Terminal()
    yield term
    if term.process.poll() is None:
        term.process.kill()
    term.process.wait()
    os.close(term.master)


def test_ctrl_c_stops_a_chat_answer_and_the_chat_goes_on(terminal):
    terminal.read_until(b">>> ")
    for after in (0.0, 0.1, 0.25, 0.4):
        terminal.type("Once upon a time")
        terminal.read_until(b"Once upon a time\r\n")  # the terminal's echo: now it answers
        answer = wait_for_bytes(terminal.master, 10)
        time.sleep(after)
        terminal.process.send_signal(signal.SIGINT)
        terminal.screen = answer
        terminal.read_until(b">>> ", timeout=30)  # the answer stopped, the next message is asked for
    # At the prompt: as before, a hint and the chat goes on. CPython's readline prints the prompt, then
    # waits in select() and checks signals only when select is interrupted: a SIGINT landing between
    # the two (a busy machine widens that window past the test's reaction time, never a person's)
    # waits for the next key or press. So a second press comes if the first shows nothing.
    for press in range(2):
        terminal.process.send_signal(signal.SIGINT)
        try:
            hint = terminal.read_until(b">>> ", timeout=5)
            break
        except AssertionError:
            assert press == 0, "two Ctrl-C at the prompt showed no hint"
    assert b"Use Ctrl + d or /bye to exit." in hint
    terminal.type("/set parameter num_predict 12")
    terminal.read_until(b">>> ")
    terminal.type("The king said")
    answer = terminal.read_until(b">>> ")
    assert len(answer.partition(b"The king said\r\n")[2].strip()) > 0, answer  # it answers the next message
    terminal.type("/bye")
    _, stderr = terminal.process.communicate(timeout=30)
    assert terminal.process.returncode == 0 and b"Traceback" not in stderr, stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_stopped_by_ctrl_c_twice_during_a_streamed_answer_exits_130_without_tracebacks():
    """The second Ctrl-C makes uvicorn exit at once, cancelling the answer in flight: exit 130, as
    `run`, and no CancelledError tracebacks from the requests or the lifespan."""
    import http.client
    import threading
    import urllib.request

    port = free_port()
    process = start("serve", "demo", "--port", str(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline and process.poll() is None, "the server did not come up"
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    body = b'{"model": "demo", "messages": [{"role": "user", "content": "In the beginning"}], ' \
           b'"max_tokens": 900, "stream": true}'
    started = threading.Event()

    def stream():
        request = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                answer.read(64)
                started.set()
                answer.read()
        except (OSError, http.client.HTTPException):  # cut off by the server's exit
            pass

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert started.wait(60)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    assert_ended_by_ctrl_c(process)


def test_serve_on_a_busy_port_is_one_error_line_before_loading():
    import socket

    from test_cli import assert_one_line_error, localmix_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = localmix_cli("serve", "demo", "--port", taken.getsockname()[1])
    assert_one_line_error(result, "cannot listen on 127.0.0.1")
