"""GPU check: `python bench/gpu_check.py QUANTIZED_MODEL_FOLDER` on a machine with mlx-cuda.

The CPU fast path must not apply on a GPU (quantized weights stay quantized), generation works,
and greedy output matches the CPU backend."""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa
import mlx.core as mx
from engine.models.memory import MemoryGate
from engine.models.probe import probe
from engine.generation.text import ChatMessage, SamplingParams, TextDelta, Finished, TextRunner
from engine.models.weights import on_gpu

out = {"device": str(mx.default_device()), "on_gpu": on_gpu(), "blas": engine.cpu.blas.active().name}
folder = Path(sys.argv[1])
p = probe(folder)
out["probe"] = {"type": p.type, "runnable": p.runnable, "reason": p.reason, "quantized": p.quantized}
runner = TextRunner.load("tiny", p, "auto", MemoryGate())
out["dtype_policy_on_gpu"] = runner.dtype

def greedy(r, n=24):
    ids = r.encode_chat([ChatMessage("user", "Hello there, how are you?")])
    t = time.perf_counter()
    evs = list(r.generate(ids, n, SamplingParams(temperature=0, logit_bias=((2, -100.0),)), lambda: False))
    dt = time.perf_counter() - t
    return "".join(e.text for e in evs if isinstance(e, TextDelta)), [e for e in evs if isinstance(e, Finished)][0], dt

text_gpu, fin, dt = greedy(runner)
out["gpu"] = {"tokens": fin.completion_tokens, "seconds": round(dt, 3), "finish": fin.finish_reason}
greedy(runner, 200)
t2, fin2, dt2 = greedy(runner, 200)
out["gpu_200_tokens_per_s"] = round(fin2.completion_tokens / dt2, 1)
mx.set_default_device(mx.cpu)
cpu_runner = TextRunner.load("tiny", p, "keep", MemoryGate())
text_cpu, _, _ = greedy(cpu_runner)
out["greedy_equal_gpu_cpu"] = text_gpu == text_cpu
out["texts"] = [text_gpu[:80], text_cpu[:80]]
print(json.dumps(out, indent=1))
