"""`localmix bench` with lists of sizes (`-p 128,512`): its rows, its JSON lines and the kernels it
names; and the Speed table of scripts/speed_vs_llama.py, made from figures written here (no
benchmark runs)."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import assert_one_line_error, localmix_cli

# What `bench --json` printed for a model without an expert cache before -p took lists: the scripts
# (speed_vs_llama.py, busy_bench.py, offload_bench.py) read these from the last line.
KEYS = {"cold", "prompt_tokens", "gen_tokens", "repeat", "threads", "tokens_per_thread_count", "concurrency",
        "prefill_tok_s", "decode_tok_s", "decode_gb_s", "peak_rss_mb", "ttft_s"}


def table_rows(stdout: str) -> list[tuple[int, int]]:
    """(prompt, generated) of each row of bench's table on the float tiny model (numpy's row)."""
    return [(int(p), int(n)) for p, n in re.findall(r"numpy \(reference\)\s+\d+\s+(\d+)\s+(\d+)\s", stdout)]


def test_one_prompt_length_ends_in_the_json_line_it_always_did(tiny_model_dir):
    result = localmix_cli("bench", tiny_model_dir, "-p", "8", "-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) == KEYS
    assert (figures["prompt_tokens"], figures["gen_tokens"]) == (8, 2)
    assert not any(line.lstrip().startswith("{") for line in lines[:-1])  # the table, then one JSON line
    assert table_rows(result.stdout) == [(8, 2)]


def test_lists_give_a_row_and_a_json_line_per_size(tiny_model_dir):
    result = localmix_cli("bench", tiny_model_dir, "-p", "4,8", "-n", "2,3", "--json")
    assert result.returncode == 0, result.stderr
    sizes = [(4, 2), (4, 3), (8, 2), (8, 3)]  # every prompt length with every -n, prompts outermost
    assert table_rows(result.stdout) == sizes
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()[-4:]]
    assert [(r["prompt_tokens"], r["gen_tokens"]) for r in rows] == sizes
    assert all(set(r) == KEYS and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert not result.stdout.strip().splitlines()[-5].lstrip().startswith("{")  # four lines, not five
    # Without --json: the table alone, still a row per size.
    plain = localmix_cli("bench", tiny_model_dir, "-p", "4,8", "-n", "2")
    assert table_rows(plain.stdout) == [(4, 2), (8, 2)] and "{" not in plain.stdout, plain.stderr


@pytest.mark.parametrize("args, message", [
    (["-p", "0"], "at least 1"),
    (["-p", "4,0"], "-p counts must be at least 1, not 0"),
    (["-p", "abc"], "-p takes token counts separated by commas (e.g. 128,512), not 'abc'"),
    (["-p", "128,,"], "not '128,,'"),
    (["-p", ",128"], "not ',128'"),
    (["-p", "-5"], "not '-5'"),
    (["-p", "1_0"], "not '1_0'"),
    (["-n", "2,x"], "-n takes token counts"),
    (["-p", ",".join(["4"] * 17)], "-p takes at most 16 counts, not 17"),
])
def test_bad_lists_are_one_error_line(tiny_model_dir, args, message):
    assert_one_line_error(localmix_cli("bench", tiny_model_dir, *args), message)


def test_every_size_is_checked_before_the_first_run(tiny_model_dir):
    """The tiny model's context is 512: 600 fails, and 4 (listed first) is not measured before."""
    result = localmix_cli("bench", tiny_model_dir, "-p", "4,600", "-n", "2", "--json")
    assert_one_line_error(result, "-p plus -n (600 + 2) exceed the model's context of 512")
    assert result.stdout == ""


def test_the_table_names_the_kernels(tiny_model_dir):
    """A float checkpoint runs the numpy reference; on the numba backend the name follows
    LOCALMIX_KERNELS (plain everywhere; avx2 where the CPU has it)."""
    result = localmix_cli("bench", tiny_model_dir, "-p", "4", "-n", "2")
    assert re.search(r"^\s*model\s+kernels\s+threads\s+prompt\s+generated\s", result.stdout, re.M), result.stdout
    assert "numpy (reference)" in result.stdout
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    settings = ["plain"] + (["avx2"] if {"avx2", "fma", "f16c"} <= set(cpu.split()) else [])
    for setting in settings:
        named = subprocess.run([sys.executable, "-c", "from localmix.bench import kernels_used as k; "
                                "print(k('numba'), k('numpy'), k('mlx'))"],
                               capture_output=True, text=True, env={**os.environ, "LOCALMIX_KERNELS": setting})
        assert named.stdout.split() == [setting, "numpy", "(reference)", "mlx"], named.stderr


def speed_script():
    path = Path(__file__).parents[1] / "scripts" / "speed_vs_llama.py"
    spec = importlib.util.spec_from_file_location("speed_vs_llama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rounds(*figures):
    """(prefill at 128, prefill at 512, decode tok/s, decode GB/s or None) per round."""
    return [{"prefill_tok_s": {128: a, 512: b}, "decode_tok_s": d, "decode_gb_s": g} for a, b, d, g in figures]


def test_speed_table_medians_ratios_and_bandwidth():
    script = speed_script()
    runs = {
        (2, "Q4_0", None): rounds((100, 80, 40, None), (90, 70, 44, None), (110, 90, 42, None)),
        # 0.25 GB a token: 60 tok/s -> 15 GB/s
        (2, "Q4_0", "default"): rounds((150, 240, 60, 15.0), (160, 250, 62, 15.5), (140, 230, 66, 16.5)),
        (2, "Q4_0", "avx2"): rounds((120, 160, 42, 10.5)),
        (1, "Q8_0", None): rounds((50, 40, 20, None)),
        (1, "Q8_0", "default"): rounds((100, 100, 30, 13.5)),  # 0.45 GB a token
    }
    table = script.speed_table(runs, {2: 31.0, 1: 18.0}, [128, 512]).splitlines()
    assert table == [
        "| model | threads | prefill 128 tok/s | prefill 512 tok/s | decode tok/s | decode GB/s (% of bandwidth) "
        "| vs llama.cpp prefill 128 | vs llama.cpp prefill 512 | vs llama.cpp decode |",
        "|---|---|---|---|---|---|---|---|---|",
        # medians 100, 80, 42; 42 tok/s at localmix's 0.25 GB a token: 10.5 GB/s, 33.9% of 31
        "| llama.cpp Q4_0 | 2 | 100.0 | 80.0 | 42.0 | ~10.5 (34%) |  |  |  |",
        # medians 150, 240, 62, 15.5 GB/s (50% of 31); 150/100, 240/80, 62/42 = 1.476
        "| localmix 4-bit | 2 | 150.0 | 240.0 | 62.0 | 15.5 (50%) | 1.50x | 3.00x | 1.48x |",
        "| localmix 4-bit (AVX2 kernels only) | 2 | 120.0 | 160.0 | 42.0 | 10.5 (34%) | 1.20x | 2.00x | 1.00x |",
        # one thread against one thread's bandwidth: 0.45 GB x 20 = 9 GB/s, 50% of 18
        "| llama.cpp Q8_0 | 1 | 50.0 | 40.0 | 20.0 | ~9.0 (50%) |  |  |  |",
        "| localmix 8-bit | 1 | 100.0 | 100.0 | 30.0 | 13.5 (75%) | 2.00x | 2.50x | 1.50x |",
    ]


def test_speed_script_options_and_cpu_line():
    script = speed_script()
    assert script.counts("128,512") == [128, 512] and script.counts("2") == [2]
    for bad in ("0", "128,,", ",1", "1,-2", "a", "", "012", "128,128"):
        with pytest.raises(argparse.ArgumentTypeError):
            script.counts(bad)
    assert script.kernel_settings("default,avx2") == ["default", "avx2"]
    for bad in ("avx3", "default,default", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            script.kernel_settings(bad)
    cpuinfo = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile\n"
    assert script.cpu_summary(cpuinfo, 2) == ("CPU: Some Xeon, 2 logical CPUs; flags listed: avx2 avx512f "
                                              "avx512_vnni amx_tile; not listed: avx512bw avx_vnni amx_int8 amx_bf16")
    assert script.localmix_env("avx2")["LOCALMIX_KERNELS"] == "avx2"
    assert "LOCALMIX_KERNELS" not in script.localmix_env("default")


def test_speed_script_alternates_the_programs_and_prints_what_ran(tmp_path, monkeypatch, capsys):
    """main() with the processes it starts answered here: which ones, in which order, with which
    LOCALMIX_KERNELS, and what it makes of their answers."""
    script = speed_script()
    for made in ("mini/config.json", "mini-Q4_0.gguf", "mini-Q8_0.gguf", "home/models/mini-q4/x", "home/models/mini-q8/x"):
        (tmp_path / made).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / made).write_text("")  # prepare() finds everything made
    started = []

    def answer(cmd, env=None, **kwargs):
        cmd, kernels = [str(c) for c in cmd], (env or {}).get("LOCALMIX_KERNELS", "default")
        if cmd[1].endswith("llama_speed.py"):  # MODEL P N THREADS
            started.append(f"llama {cmd[2]} -p {cmd[3]} -n {cmd[4]} -t {cmd[5]}")
            return f"llama.cpp {cmd[2]} threads={cmd[5]} prefill {100 + int(cmd[3]) / 10:.1f} tok/s  decode 40.00 tok/s\n"
        if cmd[1] == "-c" and "amx_usable" in cmd[2]:  # whether AMX's tiles work
            return "False\n"
        if cmd[1] == "-c":  # the kernels each setting chooses
            return {"default": "avx512-vnni", "avx2": "avx2"}[kernels] + "\n"
        assert cmd[1:4] == ["-m", "localmix", "bench"], cmd
        if "--membw" in cmd:
            started.append(f"membw -t {cmd[-2]}")
            return json.dumps({"membw_gb_s": 12.5 * int(cmd[-2])}) + "\n"
        if "--json" not in cmd:  # the untimed warm-up
            started.append(f"warm {cmd[4]} {kernels}")
            return "the table\n"
        started.append(f"localmix {cmd[4]} {kernels} {' '.join(cmd[5:])}")
        prompts = cmd[cmd.index("-p") + 1].split(",")
        return "the table\n" + "".join(json.dumps({"prompt_tokens": int(p), "prefill_tok_s": 200.0 if kernels == "default"
                                                     else 150.0, "decode_tok_s": 50.0 + int(p), "decode_gb_s": 0.25 *
                                                     (50.0 + int(p))}) + "\n" for p in prompts)

    monkeypatch.setattr(script, "run", answer)
    monkeypatch.setattr(sys, "argv", ["scripts/speed_vs_llama.py", str(tmp_path), sys.executable, "--prompts", "8,16",
                                      "-n", "4", "--threads", "1,2", "--repeat", "2"])
    script.main()
    warm = ["warm mini-q4 default", "warm mini-q8 default", "warm mini-q4 avx2", "warm mini-q8 avx2"]
    one_round = [measured for t in (1, 2) for measured in (
        f"membw -t {t}",
        f"llama mini-Q4_0.gguf -p 8 -n 4 -t {t}", f"llama mini-Q4_0.gguf -p 16 -n 4 -t {t}",
        f"localmix mini-q4 default -p 8,16 -n 4 --threads {t} --json",
        f"localmix mini-q4 avx2 -p 8,16 -n 4 --threads {t} --json",
        f"llama mini-Q8_0.gguf -p 8 -n 4 -t {t}", f"llama mini-Q8_0.gguf -p 16 -n 4 -t {t}",
        f"localmix mini-q8 default -p 8,16 -n 4 --threads {t} --json",
        f"localmix mini-q8 avx2 -p 8,16 -n 4 --threads {t} --json")]
    assert started == warm + one_round + one_round
    out = capsys.readouterr().out
    assert f"python scripts/speed_vs_llama.py {tmp_path} {sys.executable} --prompts 8,16 -n 4 --threads 1,2 " \
           "--repeat 2\n" in out
    assert "localmix kernels: default -> avx512-vnni, avx2 -> avx2; AMX tiles work here (asked for, tried): False; " \
           "commit " in out
    assert "llama.cpp system info: " in out and "CPU: " in out
    assert "memory read bandwidth: 12.5 GB/s with 1 thread, 25.0 GB/s with 2 threads\n" in out
    # decode after the 8-token prompt: localmix 58 tok/s at 0.25 GB (14.5 GB/s), llama.cpp 40 (~10 GB/s),
    # of 25 GB/s with 2 threads, 12.5 with 1; prefill 200 (150 with AVX2 only) against llama.cpp's 100.8
    # and 101.6 (200/100.8 = 1.984, 200/101.6 = 1.969, 150/100.8 = 1.488, 150/101.6 = 1.476)
    assert "| llama.cpp Q4_0 | 2 | 100.8 | 101.6 | 40.0 | ~10.0 (40%) |  |  |  |" in out
    assert "| localmix 4-bit | 2 | 200.0 | 200.0 | 58.0 | 14.5 (58%) | 1.98x | 1.97x | 1.45x |" in out
    assert "| localmix 8-bit (AVX2 kernels only) | 1 | 150.0 | 150.0 | 58.0 | 14.5 (116%) | 1.49x | 1.48x | 1.45x |" in out
    assert out.count("\n| ") == 1 + 2 * 2 * 3  # the head, then threads x quantizations x (llama.cpp, 2 settings)


def test_thread_counts_are_each_rows_own(tiny_model_dir, monkeypatch):
    """The tuner counts decoded tokens over its life; a row reports only its own (3, then 2 x 5)."""
    import numba

    import localmix
    from localmix import bench
    from localmix.threads import ThreadTuner
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("a tuner that chooses needs two threads")
    llm = localmix.load(tiny_model_dir)
    monkeypatch.setattr(llm, "tuner", ThreadTuner(2))  # one that counts: the numpy backend's is fixed
    first, second = bench.run(llm, 4, 3), bench.run(llm, 4, 5, repeat=2)
    assert sum(first["tokens_per_thread_count"].values()) == 3
    assert sum(second["tokens_per_thread_count"].values()) == 10
