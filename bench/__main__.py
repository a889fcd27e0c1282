"""python -m bench: openmlx vs llama.cpp, mlx_lm.server, mlx-knife and raw mlx-lm: the same model
(llama.cpp on the GGUF the MLX folder was converted from), the same prompts.

    python -m bench                     # --quick: 50/500-token prompts, 1 and 4 streams
    python -m bench --full              # adds 2000-token prompts, 8 streams, multi-turn, openmlx-keep
    python -m bench --only openmlx --only mlx_lm.server --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from bench import report, workload
from bench.servers import Running, measure_each, peers


def default_model_dir() -> Path:
    from engine.config import openmlx_home
    from engine.models.default_model import ensure_default_model

    home = openmlx_home()
    return ensure_default_model(home / "models", home)


def measure_server(run: Running, prompts: dict[int, str], args, eos: list[int]) -> dict:
    url, model = run.url, run.peer.model_id
    out: dict = {"startup_s": run.ready_s}
    workload.stream_chat(url, model, "Hi", 4, eos)  # warm-up
    out["single"] = {str(n): workload.as_dict(workload.stream_chat(url, model, text, args.gen_tokens, eos))
                     for n, text in prompts.items()}
    out["grounded"] = workload.as_dict(workload.stream_chat(url, model, workload.GROUNDED, 2 * args.gen_tokens, eos))
    short = prompts[min(prompts)]
    out["concurrency"] = [workload.concurrent(url, model, short, args.gen_tokens, eos, n) for n in args.streams]
    overhead = [workload.stream_chat(url, model, "Hi", 1, eos).total_s for _ in range(5)]
    out["overhead_max_tokens_1_s"] = statistics.median(overhead)
    # /health (or /v1/models for peers without it) while 4 streams generate.
    busy = [threading.Thread(target=workload.stream_chat, args=(url, model, short, args.gen_tokens, eos))
            for _ in range(4)]
    for t in busy:
        t.start()
    time.sleep(0.5)
    out["health_under_load"] = workload.health_latency(url, run.peer.ready_path, samples=30)
    out["peak_rss_bytes"] = run.rss_bytes()
    for t in busy:
        t.join()
    if args.full:
        history = [{"role": "user", "content": prompts[max(prompts)]}]
        first = workload.stream_chat(url, model, "", args.gen_tokens, eos, messages=history)
        history += [{"role": "assistant", "content": "It is a long story about a city."},
                    {"role": "user", "content": "Say it again in three words."}]
        second = workload.stream_chat(url, model, "", args.gen_tokens, eos, messages=history)
        out["multi_turn"] = {"first_ttft_s": first.ttft_s, "next_ttft_s": second.ttft_s}
    out["peak_rss_bytes"] = max(out["peak_rss_bytes"], run.rss_bytes())
    return out


def _plot(out: Path) -> None:
    """PNG plots, drawn by matplotlib in a venv of its own (not an openmlx dependency)."""
    import subprocess

    from bench.servers import ensure_venv

    try:
        bin_dir = ensure_venv("plots", ["matplotlib"])
        root = Path(__file__).resolve().parent.parent
        subprocess.run([str(bin_dir / "python"), "-m", "bench.report", str(out / "results.json"), str(out)],
                       check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"bench: no plots ({e})", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an MLX model folder (default: the embedded SmolLM2)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", default=True)
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--only", action="append", help="run only these (repeatable): openmlx, openmlx-keep, "
                                                        "openmlx-nospec, mlx_lm.server, mlx-knife, llama.cpp, llama.cpp-lookup, raw")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.gen_tokens = 64 if args.full else 32
    args.streams = [1, 4, 8] if args.full else [1, 4]
    sizes = [50, 500, 2000] if args.full else [50, 500]

    model_dir = (args.model or default_model_dir()).resolve()
    count, eos = workload.count_with(model_dir)
    prompts = {n: workload.prompt_of(n, count) for n in sizes}

    names = args.only or (["openmlx", "openmlx-nospec", "openmlx-keep", "llama.cpp", "llama.cpp-lookup",
                           "mlx_lm.server", "mlx-knife", "raw"] if args.full
                          else ["openmlx", "openmlx-nospec", "llama.cpp", "llama.cpp-lookup", "mlx_lm.server",
                                "mlx-knife", "raw"])
    args.out.mkdir(parents=True, exist_ok=True)
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("mlx", "mlx-lm", "openmlx")}
    results: dict = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                                 "processor": platform.processor(), "cores": os.cpu_count(),
                                 "date": time.strftime("%Y-%m-%d")}, "versions": versions,
                     "model": str(model_dir), "mode": "full" if args.full else "quick",
                     "gen_tokens": args.gen_tokens, "prompt_tokens": {str(n): count(t) for n, t in prompts.items()},
                     "servers": {}, "raw": {}}
    table = peers(model_dir, model_dir.name, work=args.out, names=tuple(names))
    if "raw" in names:
        print("bench: raw mlx_lm.stream_generate (4-bit, bundled BLAS; float32 + OpenBLAS)", flush=True)
        results["raw"]["4bit-bundled"] = workload.raw_mlx_lm(str(model_dir), prompts, args.gen_tokens, False, eos)
        results["raw"]["float32-openblas"] = workload.raw_mlx_lm(str(model_dir), prompts, args.gen_tokens, True, eos)
    results["servers"] = measure_each(table, [n for n in names if n != "raw"], args.out,
                                      lambda run: measure_server(run, prompts, args, eos), "bench")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    md = report.markdown(results)
    (args.out / "results.md").write_text(md)
    _plot(args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
