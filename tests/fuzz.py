"""A small harness for fuzz suites: crafted inputs run through localmix's real entry points in child
processes, so that an abort, a segfault, a hang or a memory blow-up is counted instead of killing pytest.

How a suite uses it (tests/test_fuzz_files.py is one):

    from fuzz import HARMLESS, LIE, Case, run_cases

    CASES = {  # module level, built the same way whenever the module is imported (the child imports it)
        "config: layers 10^9": Case(LIE, lambda ctx, work: check_folder(mutated(ctx, work, ...))),
        ...
    }

    def test_suite(tmp_path):
        report = run_cases("test_fuzz_files", CASES, context={"base": str(folder)}, workdir=tmp_path)
        print(report.summary())      # visible with pytest -s
        report.assert_clean()

A Case is its kind (LIE: must end in LocalmixError; HARMLESS: must run through) and a function
run(context, workdir) that makes its input under workdir (a fresh folder per case) and feeds it to
the entry points; `context` is a JSON-able dict the parent passes to every case (where the base
model lies, say). Raising LocalmixError means "refused", returning means "accepted" (a string it
returns is kept as the detail: which entry point accepted, say). Anything else
is classed as a traceback (any other exception), a memory blow-up (MemoryError, or the child killed
while over its address-space limit), a crash (the child died: abort, segfault) or a hang (no answer
within timeout_s).

Each child runs a batch of cases one after another (imports and compiled kernels are paid once per
batch) under RLIMIT_AS = memory_mb; after a crash or a hang the batch goes on in a new child from the
next case.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LIE, HARMLESS = "lie", "harmless"
OUTCOMES = ("refused", "accepted", "traceback", "crash", "hang", "memory")


@dataclass
class Case:
    kind: str                                   # LIE or HARMLESS
    run: Callable[[dict, Path], object]         # run(context, workdir): raise LocalmixError to refuse


@dataclass
class Report:
    kinds: dict[str, str]                                   # case name -> LIE / HARMLESS
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (outcome, detail)
    seconds: float = 0.0

    def counts(self) -> Counter:
        return Counter(outcome for outcome, _ in self.outcomes.values())

    def failures(self) -> list[str]:
        """Cases that broke the rules: a lie accepted, a harmless input refused, and every traceback,
        crash, hang and memory blow-up."""
        bad = []
        for name, (outcome, detail) in sorted(self.outcomes.items()):
            kind = self.kinds[name]
            expected = "refused" if kind == LIE else "accepted"
            if outcome != expected:
                bad.append(f"{name} [{kind}]: {outcome} {detail}".rstrip())
        return bad

    def summary(self, title: str = "fuzz") -> str:
        c = self.counts()
        lies = sum(kind == LIE for kind in self.kinds.values())
        accepted_lies = sum(self.kinds[n] == LIE and o == "accepted" for n, (o, _) in self.outcomes.items())
        harmless_ok = sum(self.kinds[n] == HARMLESS and o == "accepted" for n, (o, _) in self.outcomes.items())
        return (f"{title}: {len(self.outcomes)} mutations ({lies} lies, {len(self.kinds) - lies} harmless) in "
                f"{self.seconds:.0f} s: {c['refused']} refused, {c['accepted']} accepted "
                f"({harmless_ok} harmless loaded, {accepted_lies} lies accepted), {c['traceback']} tracebacks, "
                f"{c['crash']} crashes, {c['hang']} hangs, {c['memory']} memory blow-ups")

    def assert_clean(self) -> None:
        missing = set(self.kinds) - set(self.outcomes)
        bad = self.failures() + [f"{name}: never ran" for name in sorted(missing)]
        assert not bad, f"{len(bad)} of {len(self.kinds)} cases broke the rules:\n" + "\n".join(bad[:60])


def run_cases(module: str, cases: dict[str, Case], context: dict | None = None, workdir: str | Path | None = None,
              timeout_s: float = 30.0, memory_mb: int = 4096, workers: int = 2, env: dict | None = None) -> Report:
    """Run every case of `cases` (the dict `module` defines at import, e.g. "test_fuzz_files") in child
    processes, `workers` at a time, each case within timeout_s and the child within memory_mb of
    address space. env: extra environment variables for the children."""
    names = list(cases)
    report = Report({name: cases[name].kind for name in names})
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fuzz-"))
    start = time.perf_counter()
    batches = [names[i::workers] for i in range(workers) if names[i::workers]]
    children: list[_Child] = []
    for batch in batches:
        children.append(_Child(module, batch, context or {}, workdir, timeout_s, memory_mb, env))
    while children:
        for child in list(children):
            if not child.poll(report):
                children.remove(child)
        time.sleep(0.01)
    report.seconds = time.perf_counter() - start
    return report


class _Child:
    """One worker process running a batch; restarted past a case that crashed or hung it."""

    def __init__(self, module, names, context, workdir, timeout_s, memory_mb, env):
        self.module, self.pending, self.context, self.workdir = module, list(names), context, workdir
        self.timeout_s, self.memory_mb, self.env = timeout_s, memory_mb, env
        self.proc = None
        self._start()

    def _start(self):
        spec = json.dumps({"module": self.module, "names": self.pending, "context": self.context,
                           "workdir": str(self.workdir), "memory_mb": self.memory_mb})
        env = {**os.environ, **(self.env or {}), "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        # stderr to a file: a chatty child must not block on a full pipe and pass for a hang
        self.stderr = tempfile.TemporaryFile(dir=self.workdir)
        self.proc = subprocess.Popen([sys.executable, __file__, spec], stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=env, start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer, self.current, self.since = b"", None, time.monotonic()
        self.started = False  # the first case also waits for imports

    def poll(self, report: Report) -> bool:
        """Read what the child said; False once its batch is done."""
        try:
            chunk = self.proc.stdout.read()
        except (BlockingIOError, ValueError):
            chunk = None
        if chunk:
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                self._line(line.decode(errors="replace"), report)
        if chunk == b"" or self.proc.poll() is not None:  # EOF: the child is gone
            rest = self.proc.stdout.read() or b""
            for line in (self.buffer + rest).split(b"\n"):
                if line:
                    self._line(line.decode(errors="replace"), report)
            self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read()[-2000:].decode(errors="replace")
            self.stderr.close()
            if self.current is not None:  # it died inside a case
                rc = self.proc.returncode
                why = f"signal {-rc}" if rc < 0 else f"exit {rc}"
                memory = "MemoryError" in err or "std::bad_alloc" in err or "Cannot allocate" in err
                report.outcomes[self.current] = ("memory" if memory else "crash", f"({why}: {err.strip()[-300:]})")
                self.pending.remove(self.current)
            elif self.pending and not self.started:
                raise RuntimeError(f"fuzz child failed before its first case: {err}")
            if self.pending:
                self._start()
                return True
            return False
        limit = self.timeout_s * (4 if not self.started else 1)
        if self.current is not None and time.monotonic() - self.since > limit:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.stderr.close()
            report.outcomes[self.current] = ("hang", f"(no answer in {limit:.0f} s)")
            self.pending.remove(self.current)
            self.current = None
            if self.pending:
                self._start()
                return True
            return False
        return True

    def _line(self, line: str, report: Report):
        if line.startswith("start\t"):
            self.current, self.since = line.split("\t", 1)[1], time.monotonic()
        elif line.startswith("end\t"):
            _, name, outcome, detail = line.split("\t", 3)
            report.outcomes[name] = (outcome, json.loads(detail))
            self.pending.remove(name)
            self.current, self.started = None, True


def _child(spec: dict) -> None:
    limit = spec["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from localmix.errors import LocalmixError

    cases = importlib.import_module(spec["module"]).CASES
    root = Path(spec["workdir"])
    for i, name in enumerate(spec["names"]):
        print(f"start\t{name}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="case-", dir=root))
        try:
            result = cases[name].run(spec["context"], work)
            outcome, detail = "accepted", str(result or "")[:300]
        except LocalmixError as e:
            outcome, detail = "refused", str(e)[:300]
        except MemoryError:
            outcome, detail = "memory", "MemoryError"
        except BaseException as e:  # noqa: BLE001 - every other exception is what we count
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            outcome, detail = "traceback", "".join(tb[-3:])[-600:]
        print(f"end\t{name}\t{outcome}\t{json.dumps(detail)}", flush=True)
        _remove(work)


def _remove(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
