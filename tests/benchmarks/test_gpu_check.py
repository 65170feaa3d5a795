"""``benchmarks/gpu_check.py``: the prepared GPU check, kept runnable by its CPU dry run.

The dry run is the whole script (install, worker with the Triton kernels under the
interpreter, tests collected, table) on tiny shapes, in a subprocess; its rows are
checked against the truth computed here: ``F.cross_entropy`` in float64 on the same
bf16 inputs. The verdict rule and the phase machinery are checked in this process
on hand-made rows and a failing method.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def child_env() -> dict[str, str]:
    """This tree's sources first, as the suite runs them; no interpreter flag inherited."""
    old = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([str(REPO / "src")] + ([old] if old else []))
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole check (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--wheels", str(out / "no-wheels")],
        env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return done, out


def test_dry_run_writes_every_file_and_prints_the_table_last(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("rows.jsonl", "results.json", "table.md", "check.log", "worker.log", "tests.log"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip())
    assert "All lmloss checks passed." in table
    # The files a device machine sends back: at most 8, names of letters, digits, '.', '_', '-'.
    assert len(list(out.iterdir())) <= 8


def test_dry_run_ran_every_phase_and_the_kernels_under_the_interpreter(dry_run):
    _, out = dry_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    phases = {r["phase"] for r in rows}
    assert {"install", "env", "ceilings", "correctness", "methods", "sweep", "tests"} <= phases
    versions = next(r for r in rows if r["name"] == "versions")
    assert versions["triton_interpret"] == "1" and versions["lmloss_from"] == str(REPO / "src" / "lmloss")
    tests = next(r for r in rows if r["phase"] == "tests")
    assert tests["rc"] == 0 and tests["collect_only"] and "tests/fused/test_triton.py" in tests["selection"]
    assert not [r for r in rows if "error" in r and r["phase"] != "env"]  # env: CPU lacks mm(out_dtype)
    sweep = [r for r in rows if r["phase"] == "sweep"]
    assert [r["chunk_size"] for r in sweep] == list(gpu_check.DRY_SWEEP_CHUNKS)
    assert all(r["ms"] > 0 for r in sweep)


def test_dry_run_lmloss_rows_match_float64_truth(dry_run):
    _, out = dry_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    for label, shape in gpu_check.DRY_SHAPES.items():
        h, w, y = gpu_check.make_inputs(shape, torch.device("cpu"), ignore=0.0, seed=0)
        want = float(F.cross_entropy(h.detach().double() @ w.detach().double().t(), y))
        mine = {r["name"]: r for r in rows if r["phase"] == "methods" and r["shape_name"] == label}
        assert mine["floor"]["ms"] > 0
        for name in (*gpu_check.LMLOSS_BACKENDS, "naive"):
            row = mine[name]
            assert math.isclose(row["loss"], want, rel_tol=1e-4), (label, name, row["loss"], want)
            assert row["dh_err"] < 2e-2 and row["dw_err"] < 2e-2, (label, name)  # bf16 rounding, not worse
        for name in gpu_check.LMLOSS_BACKENDS:
            assert mine[name]["check"] == "ok", (label, name)
        for peer in ("liger", "liger-fp32", "cce"):  # no CUDA here: listed, not run
            assert "skipped" in mine[peer], peer
    checked = [r for r in rows if r["phase"] == "correctness"]
    assert [r["name"] for r in checked] == ["naive", "reference", *gpu_check.LMLOSS_BACKENDS]
    assert all(r.get("check", "ok") == "ok" and r["loss_err"] < 1e-3 for r in checked)


def test_verdict_fails_a_loss_off_by_more_than_1e3_and_gradients_worse_than_naive():
    margin = gpu_check.GRAD_MARGIN
    shape = [8, 4, 16]
    rows = [
        {"phase": "methods", "name": "naive", "shape": shape, "loss_err": 1e-6, "dh_err": 1e-3, "dw_err": 2e-3},
        {"phase": "methods", "name": "chunked", "shape": shape, "loss_err": 9e-4, "dh_err": 1.25e-3 + margin,
         "dw_err": 2.5e-3 + margin},
        {"phase": "methods", "name": "triton", "shape": shape, "loss_err": 2e-3, "dh_err": 1e-3, "dw_err": 2e-3},
        {"phase": "methods", "name": "triton-lowmem", "shape": shape, "loss_err": 0.0,
         "dh_err": 1.25e-3 + margin + 1e-5, "dw_err": math.nan},
        {"phase": "methods", "name": "cce", "shape": shape, "loss_err": 1.0, "dh_err": 1.0, "dw_err": 1.0},  # a peer
        {"phase": "methods", "name": "chunked", "shape": [1, 1, 1], "error": "OutOfMemoryError: CUDA out of memory"},
        {"phase": "correctness", "name": "chunked", "shape": shape, "loss_err": 0.0, "dh_err": 1.0, "dw_err": 1.0},
        {"phase": "tests", "name": "pytest", "rc": 1, "summary": "1 failed, 42 passed"},
    ]  # fmt: skip
    failures = gpu_check.verdicts(rows)
    assert [r.get("check") for r in rows[1:7]] == [
        "ok", "FAIL: loss", "FAIL: dh,dw", None, "FAIL: OutOfMemoryError: CUDA out of memory",
        "ok (loss; no naive row for grads)",  # the naive row is for another phase
    ]  # fmt: skip
    assert len(failures) == 4 and failures[-1] == "tests: 1 failed, 42 passed"


def test_a_failing_method_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
    real = gpu_check.method_fn

    def out_of_memory(hidden, weight, labels):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")

    def failing(name, device, chunk_size=None):
        return out_of_memory if name == "chunked" else real(name, device, chunk_size)

    monkeypatch.setattr(gpu_check, "method_fn", failing)
    rows = gpu_check.Rows(tmp_path / "rows.jsonl")
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path), "--methods", "chunked,naive,liger"])
    args.phase_deadline = math.inf
    gpu_check.methods_phase(rows, torch.device("cpu"), args, {"tiny": (6, 4, 11)})
    got = {r["name"]: r for r in rows.read()}
    assert got["chunked"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 9 GiB"
    assert got["naive"]["loss"] > 0 and "error" not in got["naive"]
    assert "skipped" in got["liger"]
    table = gpu_check.render(rows.read(), args, 1.0)
    assert "| chunked | error: RuntimeError: CUDA out of memory" in table and "FAILED: methods chunked" in table


def test_a_shape_whose_truth_fails_is_a_row_and_the_next_shape_still_runs(tmp_path, monkeypatch):
    real = gpu_check.truth

    def truth_once_out_of_memory(h, w, y, dtype):
        if h.shape[0] == 6:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8 GiB")
        return real(h, w, y, dtype)

    monkeypatch.setattr(gpu_check, "truth", truth_once_out_of_memory)
    rows = gpu_check.Rows(tmp_path / "rows.jsonl")
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path), "--methods", "naive"])
    args.phase_deadline = math.inf
    gpu_check.methods_phase(rows, torch.device("cpu"), args, {"big": (6, 4, 11), "small": (5, 4, 11)})
    got = [(r["shape_name"], r["name"], "error" in r) for r in rows.read()]
    assert got == [("big", "shape", True), ("small", "naive", False)]


def test_exhausted_budget_skips_phases_cleanly(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--budget", "0.01",
         "--phases", "correctness,methods,tests"],
        env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["phase"], r["skipped"]) for r in rows} == {
        ("correctness", "budget exhausted"), ("methods", "budget exhausted"), ("tests", "budget exhausted"),
    }  # fmt: skip
    assert "- methods phase: skipped: budget exhausted" in (tmp_path / "table.md").read_text()


def test_cuda_tests_are_found_by_their_decorators(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='gpu')\n"
        "def test_on_gpu():\n    pass\n"
        "@pytest.mark.cuda\nclass TestKernels:\n    pass\n"
        "@pytest.mark.parametrize('x', [1])\ndef test_cpu(x):\n    pass\n"
    )
    assert gpu_check.cuda_tests(tmp_path, base=tmp_path) == ["test_x.py::test_on_gpu", "test_x.py::TestKernels"]


def test_bad_arguments_are_refused():
    for argv, message in ((["--phases", "warp"], "unknown phase"), (["--methods", "x"], "unknown method"),
                          (["--budget", "0"], "--budget must be positive")):  # fmt: skip
        done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, argv


def test_install_puts_the_carried_wheels_first_on_the_childrens_path(tmp_path):
    """``--no-index --no-deps`` from a folder, as on a machine without a registry: a wheel
    made here installs, and a child process started with the check's environment imports it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "probe_pkg-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("probe_pkg/__init__.py", "VALUE = 42\n")
        whl.writestr("probe_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: probe-pkg\nVersion: 1.0\n")
        whl.writestr("probe_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n")  # fmt: skip
        whl.writestr("probe_pkg-1.0.dist-info/RECORD", "")
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path), "--wheels", str(wheels)])
    rows = gpu_check.Rows(tmp_path / "rows.jsonl")
    site = gpu_check.install(args, rows, timeout=120)
    assert site is not None, (tmp_path / "install.log").read_text()
    assert rows.read()[0]["rc"] == 0 and rows.read()[0]["wheels"] == ["probe_pkg-1.0-py3-none-any.whl"]
    env = gpu_check.child_env(site, dry_run=True)
    assert env["TRITON_INTERPRET"] == "1" and env["PYTHONPATH"].split(os.pathsep)[:2] == [str(site), str(REPO / "src")]
    done = subprocess.run([sys.executable, "-c", "import probe_pkg; print(probe_pkg.VALUE)"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "42", done.stderr
