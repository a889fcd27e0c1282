"""Float32 against `--cpu-dtype quantized` (weights held as blocks: a GGUF file's in their own bit
widths through the compiled kernels of engine/cpu/block_kernels.py; `--only quantized-onnxruntime`
as onnxruntime's MatMulNBits blocks) against llama.cpp, on the same GGUF file, each server alone:
decode tok/s, prefill tok/s, peak RSS.

`python -m bench.quant_cpu [--gguf FILE] [--rounds 2]` starts each server fresh in turn, rounds
alternating (float32, quantized, llama.cpp, then the next round in the opposite order), so a
machine whose speed drifts weighs on all alike; each run:

- prefill: time to the first token of a fresh ~`--prompt`-token prompt (a number at its start:
  no server reuses a cached prefix); tok/s = prompt tokens / that time; median of 2;
- decode: a `--tokens`-token story (greedy, end-of-sequence banned), tokens per second after the
  first; openmlx with `--speculative off` and llama.cpp without drafting, so both decode a
  token a pass;
- peak RSS: the server's own high-water mark (VmHWM: its load included) and the process tree's
  resident memory polled every 0.1 s, the larger; beside it the polled peak of its anonymous part
  (RssAnon: without mapped file pages, which llama.cpp's RSS counts for the GGUF it maps);
- the 1-minute load average when the server started and when it stopped (the machine is shared).

- the memory ceiling, before the first server and after the last: one process summing a
  `--ceiling-gb` float64 array (best of 5 passes, GB/s), and two such processes at once (the servers
  decode on 2 threads); each decode's share of it = bytes a decode step reads (the file's tensors
  less the embedding table, of which a step reads one row) x decode tok/s / the ceiling.

Prints a markdown table (medians over rounds, each round's figures listed under it); `--json`
writes the raw figures. Needs llama-cpp-python (the wheel in ../shared/peers) for the llama.cpp
column. Default file: the Qwen2.5-Coder-0.5B Q4_K_M the tests assemble. `--shaped 7b`: the
7B-shaped random Q4_0 model (bench/shaped_gguf.py, written on first use, ~4.3 GB; speed and memory
only, its text is garbage). Float32 is skipped where its weights (4 bytes a value) would not fit
the memory available (a 7B's ~30 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import psutil

from bench import workload
from bench.servers import Peer, Running, llama_cpp_peer

STORY = "Write a long story about a lighthouse keeper and a storm."
NAMES = ("float32", "quantized", "quantized-onnxruntime", "llama.cpp")
DEFAULT_NAMES = ("float32", "quantized", "llama.cpp")


_CEILING = """
import sys, time
import numpy as np
a = np.ones(int(float(sys.argv[1]) * 1e9) // 8)
best = 0.0
for _ in range(5):
    t = time.perf_counter()
    a.sum()
    best = max(best, a.nbytes / (time.perf_counter() - t))
print(best / 1e9)
"""


def memory_ceiling(gb: float) -> dict:
    """GB/s one process reads summing a `gb` float64 array (best of 5 passes), and two such
    processes started together (the sum of their bests): what a decode step could read at most."""
    import subprocess

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _CEILING, str(gb)], stdout=subprocess.PIPE, text=True)

    one = float(start().communicate()[0])
    pair = [start(), start()]
    return {"one_gbs": one, "two_gbs": sum(float(p.communicate()[0]) for p in pair)}


@dataclass(frozen=True)
class FileBytes:
    """What a GGUF file's tensors hold: all of them, what one decode step reads (all but the
    embedding table, unless the head is tied to it), and the values of its matrices."""

    tensors: int
    per_token: int
    matrix_values: int


def file_bytes(gguf: Path) -> FileBytes:
    from gguf import GGUFReader

    ts = GGUFReader(str(gguf)).tensors
    names = {t.name for t in ts}
    total = sum(int(t.n_bytes) for t in ts)
    embd = sum(int(t.n_bytes) for t in ts if t.name == "token_embd.weight" and "output.weight" in names)
    return FileBytes(total, total - embd, sum(int(t.n_elements) for t in ts if len(t.shape) >= 2))


def default_gguf() -> Path:
    from engine.config import openmlx_home

    return openmlx_home() / "test-assets" / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def _anon(pid: int) -> int:
    """A process's anonymous resident bytes (RssAnon): its own memory, without the pages of files
    it maps (llama.cpp maps the GGUF; those pages are the page cache's, and reclaimable)."""
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakRSS:
    """The largest resident memory a server's process tree reaches while it runs, and the largest
    anonymous part of it (`anon`, Linux only, else 0)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.anon, self._stop = pid, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        p = psutil.Process(self.pid)
        return [p, *p.children(recursive=True)]

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            try:
                tree = self._tree()
                self.peak = max(self.peak, sum(c.memory_info().rss for c in tree))
                self.anon = max(self.anon, sum(_anon(c.pid) for c in tree))
            except (psutil.Error, OSError):
                pass

    def stop(self) -> int:
        """The peak: the polled one, or the kernel's high-water mark of any one process if larger."""
        self._stop.set()
        self._thread.join()
        marks = []
        try:
            for c in self._tree():
                with open(f"/proc/{c.pid}/status") as f:
                    marks += [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")]
        except (OSError, psutil.Error):
            pass
        return max([self.peak, *marks])


def measure(run: Running, prompt: str, tokens: int, eos: list[int]) -> dict:
    url, model = run.url, run.peer.model_id
    workload.stream_chat(url, model, "Hi", 4, eos)  # warm-up
    fills = [workload.stream_chat(url, model, f"Request {i} {time.time_ns()}. {prompt}", 2, eos) for i in range(2)]
    for r in fills:
        if not r.ok:
            raise RuntimeError(r.error)
    ttft = statistics.median(r.ttft_s for r in fills)
    story = workload.stream_chat(url, model, STORY, tokens, eos)
    if not story.ok:
        raise RuntimeError(story.error)
    return {"prefill_tps": fills[0].prompt_tokens / ttft, "prompt_tokens": fills[0].prompt_tokens, "ttft_s": ttft,
            "decode_tps": story.decode_tps}


def run_one(peer: Peer, out: Path, prompt: str, tokens: int, eos: list[int]) -> dict:
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    run = Running(peer, out)
    rss = PeakRSS(run.proc.pid)
    try:
        run.wait_ready(600)
        ready_s = time.perf_counter() - start
        figures = measure(run, prompt, tokens, eos)
        figures["ready_s"] = ready_s
        if peer.ready_path == "/health":
            model = workload.client().get(run.url + "/v1/models").json()["data"][0]
            figures["health"] = {"dtype_reason": model.get("dtype_reason", ""),
                                 "decode": workload.client().get(run.url + "/health").json().get("decode", "")}
    except Exception as e:  # a server that fails is reported, not fatal
        figures = {"error": repr(e)[:300]}
    finally:
        peak = rss.stop()
        run.stop()
    figures.update(peak_rss_gb=peak / 1e9, peak_anon_gb=rss.anon / 1e9,
                   load=[round(load0, 2), round(os.getloadavg()[0], 2)])
    return figures


def openmlx(gguf: Path, model_id: str, name: str) -> Peer:
    """openmlx at `--cpu-dtype` float32 or quantized; "quantized-onnxruntime": quantized with the GGUF
    file's blocks as MatMulNBits blocks (OPENMLX_QUANT_KERNEL=onnxruntime), the path before."""
    dtype, _, kernel = name.partition("-")
    env = ["env", f"OPENMLX_QUANT_KERNEL={kernel}"] if kernel else []
    return Peer(name, env + [sys.executable, "-m", "handlers.cli", "serve", "--model", str(gguf), "--port", "{port}",
                             "--cpu-dtype", dtype, "--speculative", "off", "--embedding-model", "none",
                             "--audio-model", "none", "--log-level", "warning"], model_id, "/health")


def llama_cpp(gguf: Path, alias: str) -> Optional[Peer]:
    """llama.cpp's server on 2 threads: from this interpreter where llama-cpp-python is installed
    here, else from a venv of its own with the wheel in ../shared/peers (bench/servers.py)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return llama_cpp_peer(gguf=gguf, alias=alias, n_ctx=4096)
    return Peer("llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", "{port}",
                              "--n_ctx", "4096", "--n_threads", "2", "--model_alias", alias], alias)


def markdown(model: str, runs: dict[str, list[dict]], ceiling: Optional[dict] = None,
             sizes: Optional[FileBytes] = None) -> str:
    """The table; with `ceiling` (memory_ceiling's figures, a list: one a measurement) and `sizes`,
    each decode as GB/s read and as a share of the two-process ceiling."""
    lines = [f"Model: `{model}`, each server alone, medians over rounds (load average: 1-minute, at start and at stop "
             "of each run, over all runs)", ""]
    share = ceiling and sizes
    if share:
        two = max(c["two_gbs"] for c in ceiling)
        one_s = ", ".join(f"{c['one_gbs']:.1f}" for c in ceiling)
        two_s = ", ".join(f"{c['two_gbs']:.1f}" for c in ceiling)
        lines += [f"Memory ceiling: one process {one_s} GB/s, two at once {two_s} GB/s (before the first server, "
                  f"after the last); a decode step reads {sizes.per_token / 1e9:.2f} GB (the file's "
                  f"{sizes.tensors / 1e9:.2f} GB of tensors less the embedding table), so "
                  f"{two * 1e9 / sizes.per_token:.0f} tok/s at most", ""]
    lines += ["| server | decode tok/s | prefill tok/s (prompt tokens) | peak RSS GB (anonymous) | ready s "
              "| load average |"
              + (" decode GB/s (share of ceiling) |" if share else ""),
              "|---|---|---|---|---|---|" + ("---|" if share else "")]
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | {rs[0].get('error', 'not run')[:90]} | | | | |" + (" |" if share else ""))
            continue
        med = lambda key: statistics.median(r.get(key, 0.0) for r in ok)  # noqa: E731
        loads = [x for r in ok for x in r["load"]]
        anon = f"{med('peak_anon_gb'):.2f}" if all(r.get("peak_anon_gb") for r in ok) else "-"  # not measured
        extra = ""
        if share:
            gbs = med("decode_tps") * sizes.per_token / 1e9
            extra = f" {gbs:.1f} ({gbs / two:.0%}) |"
        lines.append(f"| {name} | {med('decode_tps'):.1f} | {med('prefill_tps'):.0f} ({ok[0]['prompt_tokens']}) | "
                     f"{med('peak_rss_gb'):.2f} ({anon}) | {med('ready_s'):.0f} | "
                     f"{min(loads):.1f}-{max(loads):.1f} |{extra}")
    lines.append("")
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            if "error" in r:
                lines.append(f"- {name}, round {i + 1}: {r['error'][:200]}")
            else:
                lines.append(f"- {name}, round {i + 1}: decode {r['decode_tps']:.1f}, prefill {r['prefill_tps']:.0f}, "
                             f"peak {r['peak_rss_gb']:.2f} GB, load {r['load'][0]}-{r['load'][1]}")
    for name, rs in runs.items():
        health = next((r["health"] for r in rs if "health" in r), None)
        if health:
            lines.append(f"- {name}: {health.get('dtype_reason', '')}; decode: {health.get('decode', '')}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quant_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF file every server serves")
    ap.add_argument("--shaped", choices=("7b",), default=None,
                    help="serve the 7B-shaped random Q4_0 model (bench/shaped_gguf.py; written if missing)")
    ap.add_argument("--ceiling-gb", type=float, default=2.0, help="the memory ceiling's array, GB (0: not measured)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="decode: the story's length")
    ap.add_argument("--prompt", type=int, default=1000, help="prefill: the fresh prompt's length in tokens")
    ap.add_argument("--only", action="append", choices=NAMES, help="run only these (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from engine.config import openmlx_home
    from engine.models.gguf_import import import_gguf

    gguf = (args.gguf or default_gguf()).resolve()
    if args.shaped:
        from bench import shaped_gguf

        gguf = shaped_gguf.default_out(args.shaped)
        if not gguf.is_file():
            print(f"writing {gguf}", file=sys.stderr, flush=True)
            shaped_gguf.write_shaped(gguf, shaped_gguf.SHAPES[args.shaped], shaped_gguf.default_tokenizer_source(),
                                     name=gguf.stem)
    folder = import_gguf(gguf, openmlx_home() / "models")  # the conversion `serve` makes, done before timing
    count, eos = workload.count_with(folder)
    prompt = workload.prompt_of(args.prompt, count)
    names = args.only or list(DEFAULT_NAMES)
    sizes = file_bytes(gguf)
    float32_gb, available_gb = sizes.matrix_values * 4 / 1e9, psutil.virtual_memory().available / 1e9
    if "float32" in names and float32_gb > available_gb:
        print(f"float32 skipped: its weights need ~{float32_gb:.1f} GB and {available_gb:.1f} GB is available",
              file=sys.stderr)
        names = [n for n in names if n != "float32"]
    ceiling = [memory_ceiling(args.ceiling_gb)] if args.ceiling_gb > 0 else []
    table: dict[str, Optional[Peer]] = {n: openmlx(gguf, folder.name, n) for n in names if n != "llama.cpp"}
    if "llama.cpp" in names:
        table["llama.cpp"] = llama_cpp(gguf, folder.name)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            peer = table[name]
            runs[name].append(run_one(peer, args.out, prompt, args.tokens, eos) if peer else
                              {"error": "llama-cpp-python isn't installed"})
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    if ceiling:
        ceiling.append(memory_ceiling(args.ceiling_gb))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ceiling": ceiling, "file_bytes": sizes.__dict__}, indent=1))
    print(markdown(folder.name, runs, ceiling or None, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
