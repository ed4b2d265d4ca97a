"""docs/benchmarks.md is generated from results/*.json and must not drift from them."""

import json
from pathlib import Path

from highwaybp.bench.report import render
from highwaybp.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_docs_match_committed_results(capsys):
    """Editing a number in docs/benchmarks.md, or a results file without rerunning
    `highwaybp report`, fails here."""
    code = main(["report", "--results", str(ROOT / "results"), "--readme", str(ROOT / "README.md"),
                 "--out", str(ROOT / "docs" / "benchmarks.md"), "--check"])
    assert code == 0, capsys.readouterr().err


def _scan_file(folder: Path, ms: float) -> None:
    folder.mkdir(parents=True)
    (folder / "scan.json").write_text(json.dumps({
        "bench": "scan", "dtype": "float32", "repeats": 3,
        "machine": {"torch": "x", "threads": 1},
        "records": [{"length": 8, "width": 4, "sequential_ms": ms, "hillis_steele_ms": 2 * ms,
                     "hillis_steele_over_sequential": 2.0}],
    }))


def test_numbers_come_from_the_file_and_unknown_files_are_listed(tmp_path):
    _scan_file(tmp_path / "results" / "bench", 1.234)
    (tmp_path / "results" / "other.json").write_text('{"something": 1}')
    text = render(tmp_path / "results")
    assert "| 8 | 4 | 1.23 | 2.47 | 2.0 |" in text
    assert "`results/bench/scan.json`" in text
    assert "- `results/other.json`" in text


def test_check_fails_on_stale_docs_and_write_fixes_it(tmp_path, capsys):
    _scan_file(tmp_path / "results" / "bench", 1.0)
    out = tmp_path / "docs" / "benchmarks.md"
    args = ["report", "--results", str(tmp_path / "results"), "--out", str(out),
            "--readme", str(tmp_path / "no-readme.md")]
    assert main([*args, "--check"]) == 1          # missing file is stale
    assert main(args) == 0
    assert main([*args, "--check"]) == 0
    out.write_text(out.read_text().replace("1.00", "0.50"))   # a hand edit
    assert main([*args, "--check"]) == 1
    assert "stale" in capsys.readouterr().err


def test_readme_table_is_spliced_between_markers_and_checked(tmp_path, capsys):
    from highwaybp.bench.report import README_BEGIN, README_END

    results = tmp_path / "results"
    (results / "ddg").mkdir(parents=True)
    (results / "ddg" / "bench_ddg.json").write_text(json.dumps({"rows": [
        {"method": "backprop", "processes": 1, "speedup_vs_best_backprop": 1.0},
        {"method": "ddg-stash", "processes": 3, "speedup_vs_best_backprop": 0.777}]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\noutro\n")
    args = ["report", "--results", str(results), "--out", str(tmp_path / "b.md"),
            "--readme", str(readme)]
    assert main(args) == 0
    text = readme.read_text()
    assert "old table" not in text and "0.78x vs 1-process backprop" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert main([*args, "--check"]) == 0
    readme.write_text(text.replace("0.78x", "1.50x"))
    assert main([*args, "--check"]) == 1


def test_layer_parallel_predictions_block_lists_where_highway_beats_exact(tmp_path):
    """The README's "where it pays" block: a cell lists exactly the P at which Highway(k)
    is predicted faster than the best exact schedule, or says none up to the largest P."""
    from highwaybp.bench.report import layer_parallel_summary

    def row(p, speedups):
        return {"model": "toy", "ranks": p, "highway": {
            str(k): {"speedup_vs_best_exact": x} for k, x in speedups.items()}}

    folder = tmp_path / "bench" / "layer_parallel"
    folder.mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps({"paper_predictions": {"rows": [
        row(2, {0: 1.2, 1: 0.9}), row(4, {0: 0.99, 1: 0.95}), row(8, {0: 1.5, 1: 0.8})]}}))
    text = layer_parallel_summary(tmp_path)
    assert "| toy | P = 2, 8 (1.20x-1.50x) | no P <= 8 |" in text


def test_bench_rnn_floors_are_rendered_from_the_file(tmp_path):
    """A `bench rnn` run's step and forward floors reach docs/benchmarks.md, numbers from the
    file; a run with --scaling-factor 1 (no autograd-loop scaling) renders too (it raised a
    TypeError before)."""
    out = tmp_path / "results" / "rnn" / "bench.json"
    assert main(["bench", "rnn", "--cell", "lstm", "--seq-len", "6", "--batch", "2",
                 "--hidden", "4", "--input-size", "3", "--k", "0,1", "--repeats", "5",
                 "--fidelity-k", "0", "--train-steps", "0", "--scaling-factor", "1",
                 "--no-memory", "--peak-matmul", "64,64,64", "--out", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    text = render(tmp_path / "results")
    step, fwd = meta["step_floor"]["6"], meta["forward_floor"]["6"]
    ratios = meta["ratios"]["6"]
    assert f"{meta['large_matmul']['onednn_gflops']:.0f} GFLOP/s through oneDNN" in text
    assert "Step matmul floor at T=6" in text
    batched = step["parts"]["recurrent_backward_batched"]
    assert (f"| recurrent backward batched | {batched['ms']:.1f} | {batched['gflop']:.2f} | "
            f"{batched['gflops']:.0f} | {batched['paths'][0]} |") in text
    assert (f"exact {step['torch_over_exact_step_floor']:.2f}x, Highway "
            f"{step['torch_over_highway_step_floor']['0']:.2f}x at k=0") in text
    assert (f"= {fwd['hbp_forward_over_matmul_plus_elementwise']:.2f}x that sum, "
            f"{fwd['hbp_forward_over_forward_floor']:.2f}x with the input projection") in text
    assert f"its backward / the floor's exact backward part: " \
        f"{step['torch_bwd_over_exact_backward_floor']:.2f}x." in text
    assert (f"torch step / highway(k=1) step floor "
            f"{ratios['torch step / highway(k=1) step floor']:.2f}x") in text
    assert "autograd-loop scaling" not in text
