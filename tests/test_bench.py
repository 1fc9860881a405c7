"""The benchmark harness (bench/run.py): well-formed rows, ratios, goals, files. Never timings."""

from __future__ import annotations

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a folder of the repository, not installed
    import bench.run

    return bench.run


def _row(**kw):
    return {"name": "n", "impl": "a", "seconds": 1.0, "ratio_to": None, **kw}


def test_check_rows_accepts_the_contract(bench_run):
    rows = [_row(), _row(impl="b", seconds=0.5, ratio_to="a", goal=1.0),
            _row(impl="c", seconds=None, skipped="not installed")]
    assert bench_run.check_rows(rows) is rows


@pytest.mark.parametrize("bad, match", [
    ({"seconds": None}, "skipped"),
    ({"seconds": -1.0}, "seconds"),
    ({"seconds": float("nan")}, "seconds"),
    ({"ratio_to": "nobody"}, "ratio_to"),
    ({"goal": 1.0}, "goal needs ratio_to"),
    ({"goal": 0}, "goal must be"),
])
def test_check_rows_rejects(bench_run, bad, match):
    with pytest.raises(ValueError, match=match):
        bench_run.check_rows([_row(**bad)])


def test_check_rows_rejects_missing_keys_and_duplicates(bench_run):
    with pytest.raises(ValueError, match="lacks"):
        bench_run.check_rows([{"name": "n", "impl": "a", "seconds": 1.0}])
    with pytest.raises(ValueError, match="twice"):
        bench_run.check_rows([_row(), _row()])
    with pytest.raises(ValueError, match="list"):
        bench_run.check_rows({"name": "n"})


def test_ratios_goals_and_markdown(bench_run):
    rows = bench_run.add_ratios([
        _row(impl="ref", seconds=2.0),
        _row(impl="fast", seconds=1.0, ratio_to="ref", goal=0.95),
        _row(impl="slow", seconds=3.0, ratio_to="ref", goal=1.0),
        _row(impl="gone", seconds=None, ratio_to="ref", goal=1.0, skipped="missing"),
    ])
    by = {r["impl"]: r for r in rows}
    assert by["fast"]["ratio"] == pytest.approx(0.5) and by["fast"]["met"] is True
    assert by["slow"]["ratio"] == pytest.approx(1.5) and by["slow"]["met"] is False
    assert by["gone"]["ratio"] is None and by["gone"]["met"] is None
    md = bench_run.render_markdown(rows, bench_run.machine_info(quick=True))
    assert "| n | fast |" in md and "0.50× ref" in md and "skipped: missing" in md and "**no**" in md


def test_time_interleaved_calls_each_function(bench_run):
    calls = {"a": 0, "b": 0}

    def make(k):
        def f():
            calls[k] += 1
        return f

    res = bench_run.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, warmup=1)
    assert calls == {"a": 4, "b": 4}
    assert set(res) == {"a", "b"} and all(v["seconds"] >= 0 and v["repeats"] == 3 for v in res.values())


def test_only_names_an_unknown_module(bench_run):
    with pytest.raises(ValueError, match="no benchmark module"):
        bench_run.discover(["no_such_bench"])


def test_quick_lora_run_writes_well_formed_results(bench_run, tmp_path):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    assert bench_run.main(["--quick", "--only", "lora", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = bench_run.check_rows(data["rows"])
    names = {r["name"] for r in rows}
    assert {"lora_layer_fwd_bwd", "lora_layer_infer_numpy", "gpt_lora_train_step", "gpt_infer_numpy"} <= names
    assert data["meta"]["quick"] is True
    for r in rows:
        if r.get("max_abs_diff_vs_numpy") is not None:  # the compared layers compute the same thing
            assert r["max_abs_diff_vs_numpy"] < 1e-4, r
    assert (tmp_path / "bench.md").read_text().startswith("Measured")


def test_peak_fractions_divide_by_the_limit_of_each_row(bench_run):
    rows = bench_run.add_ratios([
        _row(impl="mm", seconds=0.5, flops=50e9),  # 100 GFLOP/s
        _row(impl="cp", seconds=0.1, bytes=2e9),  # 20 GB/s
        _row(impl="plain", seconds=1.0),
        _row(impl="gone", seconds=None, skipped="missing", flops=1e9),
    ])
    peak = {"gemm_gflops": 200.0, "copy_gbs": 40.0, "gemm_n": 8, "gemm_numpy_gflops": 200.0,
            "gemm_torch_gflops": None, "copy_mib": 1.0}
    by = {r["impl"]: r for r in bench_run.add_peak_fractions(rows, peak)}
    assert by["mm"]["achieved"] == pytest.approx(100.0) and by["mm"]["unit"] == "GFLOP/s"
    assert by["mm"]["peak_fraction"] == pytest.approx(0.5)
    assert by["cp"]["achieved"] == pytest.approx(20.0) and by["cp"]["peak_fraction"] == pytest.approx(0.5)
    assert by["plain"]["peak_fraction"] is None and by["gone"]["achieved"] is None
    meta = {**bench_run.machine_info(quick=True), "peak": peak}
    md = bench_run.render_markdown(rows, meta)
    assert "| 100.0 GFLOP/s | 50% |" in md and "| 20.0 GB/s | 50% |" in md and "200.0 GFLOP/s" in md


@pytest.mark.parametrize("bad, match", [
    ({"flops": -1.0}, "flops must be"),
    ({"bytes": 0}, "bytes must be"),
    ({"flops": 1.0, "bytes": 1.0}, "not both"),
])
def test_check_rows_rejects_bad_work(bench_run, bad, match):
    with pytest.raises(ValueError, match=match):
        bench_run.check_rows([_row(**bad)])


def test_measure_peak_reports_positive_limits(bench_run):
    peak = bench_run.measure_peak(quick=True)
    assert peak["gemm_gflops"] > 0 and peak["copy_gbs"] > 0
    assert peak["gemm_gflops"] >= peak["gemm_numpy_gflops"]


def test_flop_models_count_the_products(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.bench_lora import gpt_step_flops, lora_layer_flops
    from lowrank_ref.nn.gpt import GPTConfig

    # one layer, N=2 tokens, 3 -> 5, r=1: forward 2·2·3·5 + 2·2·1·(3+5); backward 2·2·3·5 + 4·2·1·8
    assert lora_layer_flops(2, 3, 5, 1, backward=False) == 60 + 32
    assert lora_layer_flops(2, 3, 5, 1) == 60 + 32 + 60 + 64
    cfg = GPTConfig(vocab_size=7, block_size=2, n_layer=1, n_head=1, d_model=4, mlp_ratio=4)
    # B=1, T=2 (N=2), C=4: projections 2·2·(4·16 + 2·4·16) = 768, scores and P V 2·2·1·4·4 = 64, head 2·2·4·7 = 112
    assert gpt_step_flops(cfg, 1, 0, 0, backward=False) == 768 + 64 + 112
    assert gpt_step_flops(cfg, 1, 0, 0) == 2 * (768 + 112) + 3 * 64


def test_readme_speed_section_is_generated_from_the_committed_results(bench_run):
    text = (ROOT / "README.md").read_text()
    assert bench_run.README_BEGIN in text and bench_run.README_END in text
    body = text.split(bench_run.README_BEGIN, 1)[1].split(bench_run.README_END, 1)[0]
    assert body == "\n" + bench_run.readme_section(ROOT / "bench" / "results"), \
        "README's speed table differs from bench/results: run python -m bench.run --readme"
    assert "of peak" in body


def test_update_readme_rewrites_only_between_the_markers(bench_run, tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    rows = bench_run.add_peak_fractions(bench_run.add_ratios([_row(flops=1e9)]), {"gemm_gflops": 2.0})
    (res / "bench.json").write_text(json.dumps({"meta": bench_run.machine_info(quick=True), "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench_run.README_BEGIN}\nold table\n{bench_run.README_END}\nafter\n")
    assert bench_run.update_readme(readme, res) is True
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{bench_run.README_END}\nafter\n")
    assert "old table" not in text and "| n | a |" in text and "50%" in text
    assert bench_run.update_readme(readme, res) is False  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        bench_run.update_readme(readme, res)


def test_scaling_fit_and_report(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import scaling

    xs = [2.0, 4.0, 8.0, 16.0]
    assert scaling.fit_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert scaling.fit_exponent(xs, [5.0] * 4) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="two different sizes"):
        scaling.fit_exponent([4.0, 4.0], [1.0, 2.0])
    points = [{"sweep": "r", "method": "lora", "N": 8, "d": 8, "r": r, "seconds": 1.0 + r,
               "adapter_seconds": 0.5 * r, "adapter_bytes": 64.0 * r, "step_peak_bytes": 1.0} for r in (1, 2, 4)]
    points += [{"sweep": "d", "method": "qlora_base", "d": d, "float32_bytes": 4.0 * d * d,
                "nf4_bytes": 0.5625 * d * d, "nf4_dq_bytes": 0.52 * d * d} for d in (64, 128)]
    fits = {(f["method"], f["sweep"], f["cost"]): f["exponent"] for f in scaling.fits(points)}
    assert fits[("lora", "r", "adapter_bytes")] == pytest.approx(1.0)
    assert fits[("lora", "r", "adapter_seconds")] == pytest.approx(1.0)
    assert fits[("qlora_base", "d", "nf4_bytes")] == pytest.approx(2.0)
    res = {"points": points, "fits": scaling.fits(points), "fixed": {"N": 8, "d": 8, "r": 2},
           "gpt_fixed": {"batch": 1, "d": 8, "T": 4, "layers": 1, "vocab": 8}, "quick": True}
    md = scaling.render_markdown(res, {"date": "today", "cpu": "cpu", "blas_arch": "x"})
    assert "| lora | r | adapter_bytes | 1.00 |" in md and "4.50 bits per weight" in md
    scaling.plot(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
