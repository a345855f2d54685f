"""Commands that make and look after models: pull, list, show, rm, verify, perplexity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

import localmix
from localmix.errors import LocalmixError
from localmix.home import DEMO, list_models, models_dir, remove_model, resolve_model
from localmix.quality import kl_divergence, perplexity as text_perplexity, top1_agreement
from localmix.quant.pull import pull as pull_model, shrink as shrink_model
from localmix.experts import parse_memory
from localmix.config import ModelArgs
from localmix.experts import minimum_memory
from localmix.store import is_localmix_model, model_summary, read_manifest, verify as verify_model
from localmix.tokenizer import HF_TOKENIZER, load_tokenizer
from localmix.cli.output import PullProgress, err


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"  # the demo is 10 MB, not "0.01 GB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def is_demo(folder: Path) -> bool:
    """Whether a resolved folder is the demo that comes with localmix (inside the package)."""
    return Path(folder).resolve() == DEMO.resolve()


def shown(folder: Path) -> str:
    """A model folder as a user knows it: the demo by its name, not the package's path."""
    return "demo (built in)" if is_demo(folder) else str(folder)


def pull(source: str = typer.Argument(..., help="Hub repository (OWNER/NAME), Hugging Face or mlx-lm folder, "
                                                "or FILE.gguf."),
         bits: str = typer.Option("4", help="4, 8, mixed (experts at 4 bits, attention and embeddings at 8), 3 or 2 (experts at 3 or 2 bits, the rest at 4)."),
         group_size: int = typer.Option(64, "--group-size", help="Values per scale and bias: 32, 64 or 128."),
         name: Optional[str] = typer.Option(None, help="Model name (default: the repo's name and bits)."),
         revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub repository."),
         delete_source: bool = typer.Option(False, "--delete-source",
                                            help="Delete each source shard once converted."),
         file: Optional[str] = typer.Option(None, "--file", help="A .gguf file of the hub repository to import."),
         size: Optional[str] = typer.Option(None, "--size", help="Fit this size (e.g. 14GB): the experts "
                                            "least routed to and least hurt by it are stored at 3 or 2 bits."),
         calibration: Optional[Path] = typer.Option(None, "--calibration", help="With --size: a text file whose "
                                                    "routing counts (default: a built-in text).")):
    """Download (or read) a checkpoint and quantize it per expert into $LOCALMIX_HOME/models."""
    target, text = size_options(size, calibration)
    progress = PullProgress()
    try:
        out = pull_model(source, bits, group_size, name, revision, delete_source,
                         on_progress=progress.quantize, on_download=progress.download,
                         say=lambda text: err.print(text, markup=False), file=file, size=target, text=text,
                         on_step=progress.step)
    finally:
        progress.stop()
    summary = model_summary(out)
    print(f"pulled {summary['name']}: {summary['bits']}-bit, {gb(summary['disk_bytes'])} in {out}")


def shrink(model: str = typer.Argument(..., help="Model name or folder."),
           size: str = typer.Option(..., "--size", help="The size to fit, e.g. 14GB."),
           name: Optional[str] = typer.Option(None, help="The new model's name (default: MODEL-SIZE)."),
           calibration: Optional[Path] = typer.Option(None, "--calibration", help="A text file whose routing "
                                                      "counts (default: the model's `stats --save` counts, "
                                                      "else a built-in text).")):
    """A copy of a model that fits a size: the experts least routed to and least hurt by it at 3 or 2 bits."""
    target, text = size_options(size, calibration)
    progress = PullProgress()
    try:
        out = shrink_model(model, target, name, text, progress.step, say=lambda text: err.print(text, markup=False))
    finally:
        progress.stop()
    summary = model_summary(out)
    print(f"wrote {summary['name']}: {summary['bits']}-bit, {gb(summary['disk_bytes'])} in {out}")


def size_options(size: str | None, calibration: Path | None) -> tuple[int | None, str | None]:
    """--size in bytes and --calibration's text."""
    if calibration is not None and size is None:
        raise LocalmixError("--calibration goes with --size")
    text = None
    if calibration is not None:
        try:
            with open(calibration, encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 20)  # more than CALIBRATION_TOKENS: the rest is never read
        except OSError as e:
            raise LocalmixError(f"{calibration}: cannot read ({e.strerror})") from None
    return (None if size is None else parse_memory(size, "--size")), text


def list_command():
    """List the models in $LOCALMIX_HOME/models, and the built-in demo."""
    names = list_models()
    table = Table("name", "bits", "size", "source", "created", box=None)
    if "demo" not in names:  # a model named demo in the home comes first (resolve_model)
        s = model_summary(DEMO)
        table.add_row("demo", str(s["bits"]), gb(s["disk_bytes"]), "built in (a small base model)", "")
    for name in names:
        folder = models_dir() / name
        if is_localmix_model(folder):
            try:
                s = model_summary(folder)
            except LocalmixError:
                table.add_row(name, "?", "", "damaged manifest: localmix verify " + name, "")
                continue
            revision = (s["source"].get("revision") or "")[:10]
            source = s["source"]["repo"] + (f"@{revision}" if revision else "")
            table.add_row(name, str(s["bits"]), gb(s["disk_bytes"]), source, s["created"][:10])
        else:
            table.add_row(name, "float", "", "Hugging Face folder", "")
    console = Console(highlight=False)
    console.width = max(console.width, 160)  # one line per row, also in a narrow pipe
    console.print(table)
    if not names:
        err.print(f"no models pulled yet into {models_dir()} (`localmix pull OWNER/NAME`)", markup=False,
                  soft_wrap=True)


def ps(url: str = typer.Option("http://127.0.0.1:8080", "--url", help="The server (`localmix serve`)."),
       api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LOCALMIX_API_KEY",
                                             help="The server's API key, if it has one.")):
    """The models a running server has loaded (its /api/ps, as `ollama ps` asks it)."""
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url.rstrip("/") + "/api/ps",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            models = json.loads(response.read(1 << 20))["models"]
    except urllib.error.HTTPError as e:
        raise LocalmixError(f"{url}: answered {e.code} to /api/ps") from None
    except urllib.error.URLError as e:
        raise LocalmixError(f"no localmix server answers at {url} ({e.reason})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LocalmixError(f"no localmix server answers at {url} ({e})") from None
    table = Table("name", "size", "context", "until", box=None)
    for m in models if isinstance(models, list) else []:
        until = "the server stops" if str(m.get("expires_at", "")).startswith("0001") else str(m.get("expires_at"))
        table.add_row(str(m.get("name")), gb(int(m.get("size") or 0)), str(m.get("context_length", "")), until)
    Console(highlight=False).print(table)


def show(model: str = typer.Argument(..., help="Model name or folder."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Architecture, parameters, quantization and memory needed."""
    folder = resolve_model(model)
    if not is_localmix_model(folder):
        if (folder / "config.json").is_file():
            raise LocalmixError(f"{folder} is a Hugging Face folder; `localmix pull {folder}` makes a localmix model")
        raise LocalmixError(f"{folder} is not a model folder (no manifest.json or config.json)")
    s = model_summary(folder)
    manifest = read_manifest(folder)
    s["min_memory_bytes"] = minimum_memory(manifest, ModelArgs.from_hf_config(manifest["config"]))
    if as_json:
        print(json.dumps(s, indent=2))
        return
    experts = f"{s['experts']} experts, {s['experts_per_token']} per token" if s["experts"] else "dense"
    experts += " and a shared expert" if s["shared_expert"] else ""
    experts += f" ({s['dense_layers']} dense layer{'s' * (s['dense_layers'] > 1)})" if s["dense_layers"] else ""
    if is_demo(folder):
        s["name"], source = "demo", "built in: a small base model trained for localmix"
    else:
        source = f"{s['source']['repo']} {s['source'].get('revision') or ''}".strip()
    base = manifest["config"].get("localmix_base_model") is True
    if not base and manifest.get("tokenizer") == HF_TOKENIZER:  # a tokenizer.json without a chat template: a base model
        base = not load_tokenizer(folder, s["vocab_size"]).has_chat_template
    print(f"  name             {s['name']}\n"
          f"  architecture     {s['architecture']}: {s['layers']} layers, hidden {s['hidden_size']}, {experts}\n"
          f"  attention        {s['attention_heads']} heads, {s['kv_heads']} KV heads, context {s['context']}\n"
          f"  parameters       {count(s['parameters'])} total, {count(s['active_parameters'])} active\n"
          + ("  kind             base model: continues text, no chat template\n" if base else "") +
          f"  quantization     {s['bits']}-bit, group size {s['group_size']}\n"
          f"  on disk          {gb(s['disk_bytes'])} (dense {gb(s['dense_bytes'])}, experts {gb(s['expert_bytes'])})\n"
          f"  memory needed    {gb(s['disk_bytes'])} fully resident; "
          f"at least {gb(s['min_memory_bytes'])} (`--memory`: dense weights, a 512-token KV cache, the runtime "
          f"and one token's experts; a longer context takes expert slots' memory)\n"
          f"  source           {source}")


def rm(model: str = typer.Argument(..., help="Model name.")):
    """Delete a model."""
    print(f"deleted {remove_model(model)}")


def verify(model: str = typer.Argument(..., help="Model name or folder.")):
    """Re-hash every file against the manifest."""
    folder = resolve_model(model)
    problems = verify_model(folder)
    if problems:
        for problem in problems:
            err.print(f"{shown(folder)}: {problem}" if is_demo(folder) else f"{folder}/{problem}", markup=False)
        raise LocalmixError(f"{len(problems)} damaged file(s): pull the model again"
                            + (" (the demo: reinstall localmix)" if is_demo(folder) else ""))
    print(f"{shown(folder)}: all files intact")


def perplexity(model: str = typer.Argument(..., help="Model name or folder."),
               file: Path = typer.Argument(..., help="A text file."),
               base: Optional[str] = typer.Option(None, help="Float model (folder) to compare with: KL divergence."),
               max_tokens: int = typer.Option(1024, "--max-tokens", help="Use at most this many tokens."),
               as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Perplexity on a text, and with --base the KL divergence from the original model."""
    try:
        text = file.read_text()
    except OSError as e:
        raise LocalmixError(f"{file}: cannot read ({e.strerror})") from None
    llm = localmix.load(model)
    ids = llm.tokenizer.encode(text, bos=True)[:max_tokens]
    if len(ids) < 2:
        raise LocalmixError(f"{file}: too little text")
    with err.status(f"scoring {len(ids)} tokens"):
        logits = llm.logits(ids)
        result = {"tokens": len(ids), "perplexity": text_perplexity(logits, ids)}
        if base:
            base_logits = localmix.load(base).logits(ids)
            result.update(base_perplexity=text_perplexity(base_logits, ids), kl=kl_divergence(base_logits, logits),
                          top1=top1_agreement(base_logits, logits))
    if as_json:
        print(json.dumps(result))
        return
    print(f"perplexity {result['perplexity']:.4f} over {len(ids)} tokens")
    if base:
        print(f"base perplexity {result['base_perplexity']:.4f}; KL divergence {result['kl']:.5f} nats; "
              f"top-1 agreement {result['top1']:.3f}")


def export(model: str = typer.Argument(..., help="Model name or folder."),
           out: Path = typer.Argument(..., help="The file (gguf) or folder (mlx-lm) to write."),
           format: Optional[str] = typer.Option(None, "--format", help="gguf: a file llama.cpp and Ollama load; "
                                                                       "mlx-lm: a folder mlx_lm.load opens; "
                                                                       "hf: a bfloat16 Hugging Face folder "
                                                                       "(transformers, vLLM, SGLang) "
                                                                       "(default: gguf for OUT.gguf, else mlx-lm).")):
    """Write a model in another runner's format (gguf and mlx-lm without quantizing it again)."""
    format = format or ("gguf" if out.suffix.lower() == ".gguf" else "mlx-lm")
    if format not in ("gguf", "mlx-lm", "hf"):
        raise LocalmixError(f"unknown export format {format!r}: use gguf, mlx-lm or hf")
    folder = resolve_model(model)
    if not is_localmix_model(folder):
        raise LocalmixError(f"{model} is not a localmix model (from `localmix pull`)")
    if format == "hf":
        from localmix.quant.hf_export import export_hf
        progress = PullProgress()
        try:
            export_hf(folder, out, on_progress=lambda done, total: progress.step(f"write {out.name}", done, total))
        finally:
            progress.stop()
        err.print(f"wrote {out} (Hugging Face folder, bfloat16)", markup=False)
        return
    if format == "mlx-lm":
        from localmix.quant.mlx_lm import export_mlx_lm
        with err.status(f"writing {out}"):
            export_mlx_lm(folder, out)
        err.print(f"wrote {out} (mlx-lm format)", markup=False)
        return
    from localmix.quant.gguf_export import export_gguf
    progress = PullProgress()
    try:
        export_gguf(folder, out, on_progress=lambda done, total: progress.write(out.name, done, total),
                    say=lambda text: err.print(text, markup=False))
    finally:
        progress.stop()
    err.print(f"wrote {out} (GGUF, {out.stat().st_size / 1e9:.2f} GB)", markup=False)


def stats(model: str = typer.Argument(..., help="Model name or folder."),
          file: Optional[Path] = typer.Option(None, "--file", help="A text file to run."),
          prompt: Optional[str] = typer.Option(None, "--prompt", help="A text to run."),
          max_tokens: int = typer.Option(4096, "--max-tokens", help="Use at most this many tokens."),
          save: bool = typer.Option(False, "--save", help="Keep the counts in the model's folder, for the "
                                                          "expert cache's pinned policy (--policy pinned)."),
          plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the heatmap to this PNG file "
                                                                   "(needs matplotlib: localmix[plot])."),
          memory: Optional[str] = typer.Option(None, "--memory", help="Memory budget, e.g. 12GB (expert cache)."),
          experts_per_token: Optional[int] = typer.Option(None, "--experts-per-token"),
          min_expert_weight: float = typer.Option(0.0, "--min-expert-weight", help="Adaptive routing (see run)."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Which experts a text is routed to, per layer: a heatmap, imbalance and reuse."""
    from localmix import routing
    from localmix.cli.output import prefill_progress
    if (file is None) == (prompt is None):
        raise LocalmixError("give the text with --file or --prompt (one of them)")
    if file is not None:
        try:
            prompt = file.read_text()
        except OSError as e:
            raise LocalmixError(f"{file}: cannot read ({e.strerror})") from None
    llm = localmix.load(model, experts_per_token=experts_per_token, memory=memory, min_expert_weight=min_expert_weight)
    if not llm.config.is_moe:
        raise LocalmixError(f"{model} has no experts: every token uses the one MLP")
    ids = llm.tokenizer.encode(prompt, bos=True)[:max_tokens]
    counts = routing.collect(llm, ids, on_progress=prefill_progress())
    routed, measures = counts["routed"], routing.summary(counts)
    if save:
        path = routing.save(llm.path, routed, len(ids), str(file) if file else "--prompt")
        err.print(f"saved the routing of {len(ids)} tokens to {path}", markup=False)
    if plot is not None:
        draw_heatmap(routed, plot, f"{Path(str(model)).name}: share of {len(ids)} tokens' routes per layer")
    if as_json:
        cache = llm.expert_cache  # with --memory: its counters per layer and expert too
        per_expert = {"expert_hits": cache.hits, "expert_misses": cache.misses,
                      "prefetch_hits": cache.prefetch_hits} if cache else {}
        arrays = {**counts, **measures, **per_expert}
        print(json.dumps({**{k: v.tolist() for k, v in arrays.items()}, "tokens": len(ids)}))
        return
    console = Console(highlight=False)
    console.width = max(console.width, 60 + 6 * min(routed.shape[1], HEATMAP_EXPERTS))  # a line per layer
    console.print(heatmap_table(routed, measures, len(ids), llm.config.sparse_layers))


HEATMAP_EXPERTS = 32  # up to this many experts a layer, a cell each; beyond (64, 128), the busiest few


def heatmap_table(routed, measures: dict, tokens: int, sparse_layers) -> Table:
    """Layers x experts, each cell the expert's share of the layer's routes on a colour scale (the
    busiest experts only, where a layer has too many for a line); a dense layer says so."""
    experts = routed.shape[1]
    wide = experts > HEATMAP_EXPERTS
    columns = ["busiest experts (share %)"] if wide else [f"E{e}" for e in range(experts)]
    table = Table("layer", *columns, "max/mean", "CV", "entropy", "experts/token", "reuse",
                  title=f"share of {tokens} tokens' routes per layer (%)", box=None,
                  caption="reuse: the share of a token's experts that the next token uses again")
    shares = 100 * routed / np.maximum(routed.sum(axis=1, keepdims=True), 1)
    top = max(shares.max(), 1e-9)

    def cell(text: str, share: float) -> str:
        heat = int(215 * share / top) + 40
        return f"[{'black' if heat > 150 else 'white'} on rgb({heat},{heat // 3},{255 - heat})]{text}[/]"

    for layer, row in enumerate(shares):
        if not sparse_layers[layer]:
            table.add_row(f"{layer} dense", *[""] * (len(columns) + 5))
            continue
        if wide:
            busiest = np.argsort(-row, kind="stable")[:6]
            cells = [" ".join(cell(f"E{e}:{row[e]:.0f}", row[e]) for e in busiest)]
        else:
            cells = [cell(f"{share:4.0f}", share) for share in row]
        table.add_row(str(layer), *cells, *(f"{measures[k][layer]:.2f}" for k in
                                            ("max_over_mean", "cv", "entropy", "experts_per_token", "reuse")))
    return table


def draw_heatmap(routed, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LocalmixError("--plot needs matplotlib: pip install 'localmix[plot]'") from None
    shares = 100 * routed / np.maximum(routed.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(1.2 + 0.5 * routed.shape[1], 1.2 + 0.3 * routed.shape[0]))
    image = axes.imshow(shares, cmap="magma", aspect="auto")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, label="share of the layer's routes (%)")
    try:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise LocalmixError(f"{path}: cannot write ({e.strerror})") from None
    finally:
        plt.close(figure)
    err.print(f"wrote {path}", markup=False)


def bench(model: Optional[str] = typer.Argument(None, help="Model name or folder."),
          prompt_tokens: str = typer.Option("128", "-p", help="Prompt tokens to process; a list (128,512) "
                                                              "gives a row for each."),
          gen_tokens: str = typer.Option("64", "-n", help="Tokens to generate after the prompt; a list gives "
                                                         "a row for each."),
          repeat: int = typer.Option(1, "--repeat", help="Runs to average."),
          experts_per_token: Optional[int] = typer.Option(None, "--experts-per-token"),
          membw: bool = typer.Option(False, "--membw", help="Measure the memory read bandwidth instead."),
          backend: str = typer.Option("auto", "--backend", help="auto, numba, mlx, mlx-f32 or numpy (reference)."),
          threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads (default: the physical cores)."),
          kv_cache: str = typer.Option("f32", "--kv-cache", help="KV cache type: f32 or f16."),
          memory: Optional[str] = typer.Option(None, "--memory", help="Memory budget, e.g. 12GB (expert cache)."),
          policy: str = typer.Option("lfu", "--policy", help="Expert cache policy: lfu, lru or pinned."),
          prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="Read the experts the "
                                                  "next layer will probably want ahead of time (default: where a "
                                                  "core is free for it)."),
          shadow_bits: int = typer.Option(0, "--shadow-bits", help="Under --memory: decode with 2-bit copies of "
                                                                   "the experts not in the cache (approximate)."),
          cold: bool = typer.Option(False, "--cold", help="Drop the model's files from the page cache before "
                                                          "each run (reads then come from the disk)."),
          concurrency: int = typer.Option(1, "--concurrency", help="Decode this many sequences together (as "
                                                                    "`serve` batches concurrent answers)."),
          as_json: bool = typer.Option(False, "--json", help="End with the figures as JSON, one line per row.")):
    """Prefill and decode speed, measured as llama.cpp's speed is: a synthetic prompt, then greedy decoding.
    A row for each prompt length and number of generated tokens, each a run of its own (decode follows its
    row's prompt)."""
    from localmix import bench as benchmark
    if membw:
        gb_s = benchmark.memory_bandwidth(threads)
        print(json.dumps({"membw_gb_s": gb_s}) if as_json else f"memory read bandwidth {gb_s:.1f} GB/s")
        return
    sizes = [(p, n) for p in benchmark.parse_counts(prompt_tokens, "-p")
             for n in benchmark.parse_counts(gen_tokens, "-n")]
    if model is None:
        raise LocalmixError("name a model to benchmark (or pass --membw)")
    llm = localmix.load(model, experts_per_token=experts_per_token, backend=backend, threads=threads,
                        kv_cache=kv_cache, memory=memory, expert_policy=policy,
                        prefetch=prefetch, shadow_bits=shadow_bits)
    if llm.memory_note:
        err.print(llm.memory_note, style="dim", markup=False)
    for p, n in sizes:  # every size checked before the first run: no error after minutes of measuring
        benchmark.check(llm, p, n, repeat, concurrency)
    results = []
    for p, n in sizes:
        with err.status(f"prefill {p} tokens, generate {n}, {repeat} time(s)"):
            results.append(benchmark.run(llm, p, n, repeat, cold, concurrency))
    console = Console(highlight=False)
    console.width = max(console.width, 160)  # one line per row, also in a narrow pipe
    console.print(bench_table(str(model), benchmark.kernels_used(llm.backend), results, llm.expert_cache is not None))
    if as_json:
        for r in results:
            print(json.dumps(r))


def bench_table(model: str, kernels: str, results: list[dict], expert_cache: bool) -> Table:
    """One row per run of `bench`; with an expert cache, its figures while decoding."""
    columns = ["model", "kernels", "threads", "prompt", "generated", "prefill tok/s", "decode tok/s", "decode GB/s",
               "peak RSS MB", "TTFT s"]
    if expert_cache:
        columns += ["expert slots", "hit rate", "prefetch hits", "shadow uses", "read GB", "stalled s", "disk GB/s",
                    "disk's limit tok/s"]
    table = Table(*columns, box=None)
    for r in results:
        cells = [model, kernels, str(r["threads"]), str(r["prompt_tokens"]), str(r["gen_tokens"]),
                 f"{r['prefill_tok_s']:.2f}", f"{r['decode_tok_s']:.2f}", f"{r['decode_gb_s']:.2f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['ttft_s']:.3f}"]
        if expert_cache:
            cells += [f"{r['expert_slots']} {r['expert_policy']}", f"{r['expert_hit_rate']:.2f}",
                      f"{r['prefetch_hit_rate']:.2f}", str(r["shadow_uses"]), f"{r['expert_bytes_read'] / 1e9:.2f}",
                      f"{r['stall_s']:.2f}", f"{r['disk_gb_s']:.2f}",
                      "" if r["disk_limit_tok_s"] is None else f"{r['disk_limit_tok_s']:.2f}"]
        table.add_row(*cells)
    return table
