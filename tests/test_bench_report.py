"""The bench harness's statistics and report (no servers run here)."""
from bench import report


def fake_results():
    single = {"50": {"ttft_s": 0.3, "prefill_tps": 230.0, "decode_tps": 15.0}}
    server = {"startup_s": 4.0, "single": single, "overhead_max_tokens_1_s": 0.14,
              "concurrency": [{"streams": 4, "aggregate_tps": 15.0, "ttft_p50_s": 0.9, "ttft_p95_s": 1.4, "errors": 0}],
              "health_under_load": {"p50_ms": 3.0, "p99_ms": 7.0}, "peak_rss_bytes": 700 << 20,
              "multi_turn": {"first_ttft_s": 20.0, "next_ttft_s": 0.5}}
    peer = {**server, "single": {"50": {"ttft_s": 4.6, "prefill_tps": 15.0, "decode_tps": 6.7}},
            "concurrency": [{"streams": 4, "aggregate_tps": 7.0, "ttft_p50_s": 1.7, "ttft_p95_s": 1.8, "errors": 0}]}
    return {"machine": {"platform": "linux", "python": "3.11", "date": "2026-11-27", "cores": 2},
            "versions": {"mlx": "0.32.4"}, "model": "/m/SmolLM2", "mode": "quick", "gen_tokens": 32,
            "prompt_tokens": {"50": 70}, "servers": {"openmlx": server, "mlx_lm.server": peer},
            "raw": {"float32-openblas": {"50": {"prefill_tps": 200.0, "decode_tps": 18.0}}}}


def test_targets_met_and_missed():
    goals = {name: (value, met) for name, value, met in report.targets(fake_results())}
    decode = goals["decode >= 0.95x raw mlx-lm (same weights), 50-token prompt"]
    assert decode == ("0.83x", False)
    assert goals["aggregate tok/s at 4 streams >= mlx_lm.server"][1] is True
    assert goals["TTFT p95 at 4 streams <= mlx_lm.server"][1] is True
    assert goals["/health p99 < 50 ms under 4 streams"] == ("7.0 ms", True)
    assert goals["next-turn TTFT >= 5x faster than the first turn"] == ("40.0x", True)


def test_markdown_has_ratios_and_targets():
    md = report.markdown(fake_results())
    assert "| mlx_lm.server | 50 | 15.3 | 2.24 | 15.3 |" in md
    assert "| decode >= 0.95x raw mlx-lm (same weights), 50-token prompt | 0.83x | **no** |" in md
