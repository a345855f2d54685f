"""The command line, run as a user runs it: a separate process, text in, text out, exit codes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import localmix
from localmix.home import DEMO


def localmix_cli(*args, stdin="", env=None, cwd="/"):
    """Run `python -m localmix ARGS`; bytes are decoded without newline translation, since a random
    model's answer may hold a lone carriage return."""
    result = subprocess.run([sys.executable, "-m", "localmix", *map(str, args)], input=stdin.encode(),
                            capture_output=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def assert_one_line_error(result, message, after_progress=False):
    """A non-zero exit and one error line on stderr, no traceback. after_progress: progress bars
    (pull) may come before the error line, which is then the last."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and message in lines[-1], result.stderr
    assert after_progress or len(lines) == 1, result.stderr


GREEDY = ["--temperature", "0", "--repeat-penalty", "1", "-n", "8"]


def test_run_streams_the_chat_answer(tiny_model_dir):
    result = localmix_cli("run", tiny_model_dir, "Why is the sky blue?", *GREEDY)
    assert result.returncode == 0, result.stderr
    expected = localmix.load(tiny_model_dir).chat("Why is the sky blue?", max_tokens=8, temperature=0,
                                                  repeat_penalty=1.0)
    assert result.stdout == expected + "\n"


def test_run_raw_system_and_stdin(tiny_model_dir):
    model = localmix.load(tiny_model_dir)
    kw = dict(max_tokens=8, temperature=0, repeat_penalty=1.0)
    raw = localmix_cli("run", tiny_model_dir, "Once upon", "--raw", *GREEDY)
    assert raw.stdout == model.generate("Once upon", **kw) + "\n"
    system = localmix_cli("run", tiny_model_dir, "Hi", "--system", "Be brief.", *GREEDY)
    assert system.stdout == model.chat([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}], **kw) + "\n"
    piped = localmix_cli("run", tiny_model_dir, *GREEDY, stdin="Hi")
    assert piped.stdout == model.chat("Hi", **kw) + "\n"


def test_verbose_prints_timings(tiny_model_dir):
    result = localmix_cli("run", tiny_model_dir, "Hi", "--verbose", *GREEDY)
    assert result.returncode == 0
    assert "prompt eval rate:" in result.stderr and "eval count:           8 token(s)" in result.stderr


def test_run_by_name_and_list(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    env = {"LOCALMIX_HOME": str(tmp_path)}
    assert "tiny" in localmix_cli("list", env=env).stdout
    assert localmix_cli("run", "tiny", "Hi", *GREEDY, env=env).returncode == 0
    assert_one_line_error(localmix_cli("run", "nope", "Hi", env=env), "unknown model 'nope'")


@pytest.fixture
def broken_copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_bad_config(broken_copy):
    (broken_copy / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(localmix_cli("run", broken_copy, "Hi"), "unsupported model_type 'gpt2'")
    (broken_copy / "config.json").unlink()
    assert_one_line_error(localmix_cli("run", broken_copy, "Hi"), "config.json: no such file")


def test_truncated_weights(broken_copy):
    path = broken_copy / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    assert_one_line_error(localmix_cli("run", broken_copy, "Hi"), "truncated file")


def test_bad_values(tiny_model_dir):
    assert_one_line_error(localmix_cli("run", tiny_model_dir, "Hi", "-n", "-3"), "--max-tokens must be >= 0")
    assert_one_line_error(localmix_cli("run", tiny_model_dir, "Hi", "--top-p", "0"), "top_p must be")
    assert_one_line_error(localmix_cli("run", tiny_model_dir, "Hi", "--raw", "--system", "x"), "--system needs")
    assert_one_line_error(localmix_cli("run", tiny_model_dir, "word " * 600), "more than the model's context")
    assert_one_line_error(localmix_cli("run", tiny_model_dir, "Hi", "--experts-per-token", "9"),
                          "experts_per_token must be between 1 and 4")


def test_bad_flags_are_usage_errors(tiny_model_dir):
    result = localmix_cli("run", tiny_model_dir, "Hi", "--temperature", "warm")
    assert_one_line_error(result, "Invalid value for '--temperature'")
    assert result.returncode == 2
    result = localmix_cli("run", tiny_model_dir, "Hi", "--no-such-flag")
    assert_one_line_error(result, "No such option: --no-such-flag")
    assert result.returncode == 2


def test_chat_session_through_stdin(tiny_model_dir):
    script = "\n".join([
        "/set parameter temperature 0",
        "/set parameter num_predict 4",
        "/set parameter top_k many",
        "/show parameters",
        "Hello there",
        '"""',
        "a message",
        "on two lines",
        '"""',
        "/set system You are terse.",
        "/show system",
        "/clear",
        "/frobnicate",
        "/?",
        "/bye",
    ]) + "\n"
    result = localmix_cli("chat", tiny_model_dir, "--repeat-penalty", "1", stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Set parameter 'temperature' to '0'" in out and "Set parameter 'num_predict' to '4'" in out
    assert "Couldn't set parameter: top_k takes an integer" in out
    assert "temperature    0.0" in out
    assert "You are terse." in out and "Cleared session context" in out
    assert "Unknown command '/frobnicate'" in out and "/set parameter NAME VALUE" in out


def test_chat_ends_on_ctrl_d(tiny_model_dir):
    result = localmix_cli("chat", tiny_model_dir, stdin="")
    assert result.returncode == 0


def test_chat_keeps_history(tiny_model_dir):
    from localmix.cli.chat import ChatSession
    from localmix.cli.output import err
    from localmix.sampling import SamplingParams
    model = localmix.load(tiny_model_dir)
    session = ChatSession(model, "tiny", SamplingParams(temperature=0, repeat_penalty=1.0), 4, "sys", False, 0.0, err)
    session.answer("first")
    session.answer("second")
    roles = [m["role"] for m in session.history]
    assert roles == ["user", "assistant", "user", "assistant"]
    first_answer = model.chat([{"role": "system", "content": "sys"}, {"role": "user", "content": "first"}],
                              max_tokens=4, temperature=0, repeat_penalty=1.0)
    assert session.history[1]["content"] == first_answer
    assert session.messages("third")[0] == {"role": "system", "content": "sys"}


def test_bench_reports_llama_bench_figures(tiny_model_dir):
    result = localmix_cli("bench", tiny_model_dir, "-p", "16", "-n", "4", "--repeat", "2", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"prefill_tok_s", "decode_tok_s", "decode_gb_s", "peak_rss_mb", "ttft_s"} <= set(figures)
    assert all(figures[k] > 0 for k in ("prefill_tok_s", "decode_tok_s", "decode_gb_s", "peak_rss_mb", "ttft_s"))
    assert "decode tok/s" in result.stdout
    assert_one_line_error(localmix_cli("bench", tiny_model_dir, "-p", "0"), "at least 1")
    one_thread = localmix_cli("bench", tiny_model_dir, "-p", "4", "-n", "2", "--threads", "1", "--json")
    assert json.loads(one_thread.stdout.strip().splitlines()[-1])["threads"] == 1, one_thread.stderr
    assert_one_line_error(localmix_cli("bench", tiny_model_dir, "--threads", "0"), "--threads must be between 1")
    assert_one_line_error(localmix_cli("run", tiny_model_dir, "Hi", "--kv-cache", "f8"), "unknown KV cache type")
    assert_one_line_error(localmix_cli("bench", tiny_model_dir, "-p", "600"), "exceed the model's context")
    assert_one_line_error(localmix_cli("bench"), "name a model")
    membw = json.loads(localmix_cli("bench", "--membw", "--json").stdout)
    assert membw["membw_gb_s"] > 0


def test_bytes_per_token_counts_routed_experts_only(tiny_model_dir):
    from localmix.bench import bytes_per_token
    top2, top1 = localmix.load(tiny_model_dir), localmix.load(tiny_model_dir, experts_per_token=1)
    expert = top2.transformer.weights.layers[0].experts[0]
    one_expert = expert.w1.nbytes + expert.w2.nbytes + expert.w3.nbytes
    layers = top2.config.num_hidden_layers
    assert bytes_per_token(top2) - bytes_per_token(top1) == layers * one_expert


def test_empty_prompt_is_an_error(tiny_model_dir):
    assert_one_line_error(localmix_cli("run", tiny_model_dir, ""), "the prompt is empty")
    assert_one_line_error(localmix_cli("run", tiny_model_dir, stdin=" \n"), "the prompt is empty")


def test_version_and_short_help():
    from importlib.metadata import version
    result = localmix_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"localmix {version('localmix')}"
    short, long = localmix_cli("-h"), localmix_cli("--help")
    assert short.returncode == 0 and short.stdout == long.stdout and "Commands" in short.stdout
    assert localmix_cli("run", "-h").stdout == localmix_cli("run", "--help").stdout


def test_user_facing_text_names_no_developer_paths(tmp_path):
    """The built-in demo is listed, and help, show and verify speak of it by name, not by where the
    package lies or where it was made."""
    env = {"LOCALMIX_HOME": str(tmp_path)}
    listed = localmix_cli("list", env=env)
    assert listed.returncode == 0 and re.search(r"^\s*demo\s.*built in", listed.stdout, re.M), listed.stdout
    texts = [localmix_cli(*args, env=env).stdout for args in (["bench", "--help"], ["show", "demo"], ["verify", "demo"])]
    for text in texts:
        assert "../" not in text and "/tmp/" not in text and "site-packages" not in text and str(DEMO) not in text, text
    assert "base model" in texts[1]


def test_ctrl_c_in_chat_keeps_the_partial_answer(tiny_model_dir):
    """A real SIGINT in the middle of an answer (this process is the chat): no KeyboardInterrupt, the
    answer stops, and the part shown stays in the conversation."""
    from localmix.cli.chat import ChatSession
    from localmix.cli.output import err
    from localmix.sampling import SamplingParams
    model = localmix.load(tiny_model_dir)
    stream = model.stream

    def interrupted_after_three_tokens(*args, **kwargs):
        for i, response in enumerate(stream(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield response

    model.stream = interrupted_after_three_tokens
    session = ChatSession(model, "tiny", SamplingParams(temperature=0, repeat_penalty=1.0), 50, None, False, 0.0, err)
    session.answer("first")
    model.stream = stream
    shown = model.generate([{"role": "user", "content": "first"}], 3, temperature=0, repeat_penalty=1.0)
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == shown  # three tokens of 50: stopped where the signal came
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C at the prompt works as before


@pytest.mark.parametrize("name", ["", ".", "a/..", "../models"])
def test_rm_of_a_name_that_is_not_one_model_deletes_nothing(tmp_path, name):
    """`localmix rm ''` once named the models folder itself and deleted every model."""
    kept = tmp_path / "models" / "kept"
    kept.mkdir(parents=True)
    (tmp_path / "models" / "notes.txt").write_text("mine")
    result = localmix_cli("rm", name, env={"LOCALMIX_HOME": str(tmp_path)})
    assert_one_line_error(result, "unknown model")
    assert kept.is_dir() and (tmp_path / "models" / "notes.txt").read_text() == "mine"


def test_show_of_a_folder_that_is_no_model_says_so(tmp_path):
    assert_one_line_error(localmix_cli("show", tmp_path), "is not a model folder")
    assert_one_line_error(localmix_cli("run", "", "hi"), "give a model name or folder")


@pytest.mark.parametrize("home, chosen", [(None, "{home}/numba-cache"), ("/proc/localmix-unwritable", "{tmp}"),
                                          ("set", "{tmp_path}/mine")])
def test_numba_keeps_its_cache_in_the_users_folders_never_in_the_package(tmp_path, home, chosen):
    """$LOCALMIX_HOME/numba-cache, or the user's NUMBA_CACHE_DIR; where the home cannot be written, a
    temporary folder (Numba would fall back to writing beside the installed source)."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["LOCALMIX_HOME"] = str(tmp_path) if home in (None, "set") else home
    if home == "set":
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", "import localmix, numba, os; print(numba.config.CACHE_DIR)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    expected = chosen.format(home=tmp_path, tmp_path=tmp_path, tmp=tempfile.gettempdir())
    assert out.startswith(expected) and "site-packages" not in out, out
    assert os.access(out, os.W_OK)
