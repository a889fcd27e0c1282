"""results.json -> a markdown table (with ratios) and PNG plots."""
from __future__ import annotations

from pathlib import Path


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.3g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def targets(r: dict) -> list[tuple[str, str, bool]]:
    """openmlx's speed goals, each with the measured value and whether it is met."""
    out: list[tuple[str, str, bool]] = []
    ours = r["servers"].get("openmlx")
    if not ours or "error" in ours:
        return out
    raw = r.get("raw", {}).get("float32-openblas", {})
    for n, s in ours["single"].items():
        if n in raw and raw[n].get("decode_tps"):
            x = s["decode_tps"] / raw[n]["decode_tps"]
            out.append((f"decode >= 0.95x raw mlx-lm (same weights), {n}-token prompt", f"{x:.2f}x", x >= 0.95))
    peer = r["servers"].get("mlx_lm.server")
    if peer and "error" not in peer:
        theirs = {c["streams"]: c for c in peer["concurrency"]}
        for c in ours["concurrency"]:
            t = theirs.get(c["streams"])
            if c["streams"] < 4 or not t:
                continue
            out.append((f"aggregate tok/s at {c['streams']} streams >= mlx_lm.server",
                        f"{c['aggregate_tps']:.1f} vs {t['aggregate_tps']:.1f}", c["aggregate_tps"] >= t["aggregate_tps"]))
            out.append((f"TTFT p95 at {c['streams']} streams <= mlx_lm.server",
                        f"{c['ttft_p95_s']:.2f} s vs {t['ttft_p95_s']:.2f} s", c["ttft_p95_s"] <= t["ttft_p95_s"]))
    grounded = ours.get("grounded", {}).get("decode_tps")
    for peer_name, goal in (("openmlx-nospec", 2.5), ("llama.cpp-lookup", 0.5)):
        peer = r["servers"].get(peer_name)
        if grounded and peer and "error" not in peer and peer.get("grounded", {}).get("decode_tps"):
            x = grounded / peer["grounded"]["decode_tps"]
            out.append((f"decode, grounded answer, >= {goal}x {peer_name}", f"{x:.2f}x", x >= goal))
    p99 = ours["health_under_load"]["p99_ms"]
    out.append(("/health p99 < 50 ms under 4 streams", f"{p99:.1f} ms", p99 < 50))
    mt = ours.get("multi_turn")
    if mt and mt["next_ttft_s"]:
        x = mt["first_ttft_s"] / mt["next_ttft_s"]
        out.append(("next-turn TTFT >= 5x faster than the first turn", f"{x:.1f}x", x >= 5))
    return out


def markdown(r: dict) -> str:
    servers = {k: v for k, v in r["servers"].items() if "error" not in v}
    m = r["machine"]
    lines = [f"# bench ({r['mode']}): {Path(r['model']).name}", "",
             f"{m.get('date', '')}, {m['platform']}, {m.get('cores', '?')} cores, Python {m['python']}, "
             f"{', '.join(f'{k} {v}' for k, v in r.get('versions', {}).items())}; greedy, end-of-sequence banned, "
             f"{r['gen_tokens']} generated tokens counted with the model's tokenizer; "
             f"prompt tokens: {r['prompt_tokens']}.", ""]
    goals = targets(r)
    if goals:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in goals]
        lines.append("")
    for name, v in r["servers"].items():
        if "error" in v:
            lines.append(f"- {name}: failed: {v['error']}")
    lines += ["## Single stream", "", "| server | prompt | TTFT s | prefill tok/s | decode tok/s |", "|---|---|---|---|---|"]
    for name, v in servers.items():
        for n, s in v["single"].items():
            lines.append(f"| {name} | {n} | {_fmt(s['ttft_s'])} | {_fmt(s['prefill_tps'])} | {_fmt(s['decode_tps'])} |")
    for kind, raw in r.get("raw", {}).items():
        if "error" in raw:
            lines.append(f"| raw mlx-lm {kind} | - | failed | | |")
            continue
        for n, s in raw.items():
            lines.append(f"| raw mlx-lm {kind} | {n} | - | {_fmt(s['prefill_tps'])} | {_fmt(s['decode_tps'])} |")
    if "openmlx" in servers and len(servers) + len(r.get("raw", {})) > 1:
        lines += ["", "## openmlx relative to each peer (x faster; >1 is better)", "",
                  "| peer | prompt | prefill x | decode x | TTFT x |", "|---|---|---|---|---|"]
        ours = servers["openmlx"]["single"]
        for name, v in servers.items():
            if name == "openmlx":
                continue
            for n, s in v["single"].items():
                o = ours[n]
                lines.append(f"| {name} | {n} | {_fmt(o['prefill_tps'] / s['prefill_tps'] if s['prefill_tps'] else None)} "
                             f"| {_fmt(o['decode_tps'] / s['decode_tps'] if s['decode_tps'] else None)} "
                             f"| {_fmt(s['ttft_s'] / o['ttft_s'] if o['ttft_s'] else None)} |")
        for kind, raw in r.get("raw", {}).items():
            if "error" in raw:
                continue
            for n, s in raw.items():
                o = ours[n]
                lines.append(f"| raw mlx-lm {kind} | {n} | {_fmt(o['prefill_tps'] / s['prefill_tps'])} "
                             f"| {_fmt(o['decode_tps'] / s['decode_tps'])} | - |")
    lines += ["", "## Grounded answer (a code edit quoting the prompt; speculation's case)", "",
              "| server | TTFT s | decode tok/s |", "|---|---|---|"]
    for name, v in servers.items():
        g = v.get("grounded")
        if g:
            lines.append(f"| {name} | {_fmt(g['ttft_s'])} | {_fmt(g['decode_tps'])} |")
    lines += ["", "## Concurrency (short prompt)", "", "| server | streams | aggregate tok/s | TTFT p50 s | TTFT p95 s | errors |",
              "|---|---|---|---|---|---|"]
    for name, v in servers.items():
        for c in v["concurrency"]:
            lines.append(f"| {name} | {c['streams']} | {_fmt(c['aggregate_tps'])} | {_fmt(c['ttft_p50_s'])} "
                         f"| {_fmt(c['ttft_p95_s'])} | {c['errors']} |")
    lines += ["", "## Server", "", "| server | startup s | overhead (max_tokens=1) s | health p50 ms under 4 streams "
              "| p99 ms | peak RSS MiB | next-turn TTFT s (first) |", "|---|---|---|---|---|---|---|"]
    for name, v in servers.items():
        mt = v.get("multi_turn")
        lines.append(f"| {name} | {_fmt(v['startup_s'])} | {_fmt(v['overhead_max_tokens_1_s'])} "
                     f"| {_fmt(v['health_under_load']['p50_ms'])} | {_fmt(v['health_under_load']['p99_ms'])} "
                     f"| {v['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{_fmt(mt['next_ttft_s']) + ' (' + _fmt(mt['first_ttft_s']) + ')' if mt else '-'} |")
    lines.append("")
    return "\n".join(lines)


def plots(r: dict, out: Path) -> None:
    """Bar charts of prefill and decode tok/s; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = []
    for name, v in r["servers"].items():
        if "error" not in v:
            rows += [(name, n, s["prefill_tps"], s["decode_tps"]) for n, s in v["single"].items()]
    for kind, raw in r.get("raw", {}).items():
        if "error" not in raw:
            rows += [(f"raw {kind}", n, s["prefill_tps"], s["decode_tps"]) for n, s in raw.items()]
    for idx, metric in ((2, "prefill"), (3, "decode")):
        fig, ax = plt.subplots(figsize=(9, 4))
        labels = [f"{a}\n{n} tok" for a, n, *_ in rows]
        ax.bar(range(len(rows)), [row[idx] for row in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"{metric} tokens/s")
        ax.set_title(f"{metric} speed, {Path(r['model']).name}")
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":  # python -m bench.report results.json OUT_DIR (in a venv with matplotlib)
    import json
    import sys

    plots(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))


def save_table(rows: list[dict], out: Path, name: str, columns: dict[str, str]) -> None:
    """Write rows to OUT/NAME.json and print them as a markdown table (header -> row key)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[key]) for key in columns.values()) + " |")
