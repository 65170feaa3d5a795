"""The prepared GPU check: install, test, check and time lmloss's fused backends in one command.

Made for a device machine lent for a few minutes (one H200, PyTorch 2.11, Triton 3.6,
no package registry): one command, at most ``--budget`` seconds (default 330), and
whatever ran comes back even if a phase fails or the budget runs out. Phases:

1. ``install``: ``pip install --no-index --no-deps`` of the wheels in ``--wheels``
   (lmloss itself, liger-kernel, cut-cross-entropy; ``make gpu-wheels``) into a
   temporary folder put first on ``PYTHONPATH`` of every child process;
2. ``env``: versions, the device, and probes of the PyTorch APIs lmloss relies on;
3. ``ceilings``: a bf16 8192^3 matrix product and a device-to-device copy;
4. ``correctness``: each lmloss backend on a slice (1024 tokens of the Llama-3 head)
   against float64 truth, next to the naive bf16 path's error;
5. ``methods``: per shape, every method on the same inputs: forward+backward time
   (median of CUDA-event timings after warm-up), TFLOP/s effective (6·N·D·V / time),
   peak extra memory (``max_memory_allocated`` minus the inputs and the returned
   gradients), and loss/gradient errors against float32 truth (materialized logits);
6. ``sweep``: ``chunk_size`` of the ``triton`` backend;
7. ``tests``: ``tests/fused/test_triton.py`` and every test whose decorator names CUDA.

Phases 2-6 run in one child process (the "worker", hard-killed at its deadline) that
appends each result to ``rows.jsonl`` as soon as it has it. Everything lands in
``$OUT`` (default ``./gpu-check-out``): ``rows.jsonl``, ``results.json``,
``table.md``, ``check.log``, ``worker.log``, ``install.log``, ``tests.log``. The
table is printed last. A method that fails (missing peer, out of memory) is a row
with its error. Exit status 1 when an lmloss check or a test failed.

``--dry-run``: the same code path on CPU with tiny shapes, the Triton kernels under
``TRITON_INTERPRET=1`` (set in the worker's environment, before it imports Triton),
peers that need CUDA listed as skipped (Liger, when installed, runs under the
interpreter too), tests only collected; timings are CPU
wall-clock and mean nothing. ``tests/benchmarks/test_gpu_check.py`` runs it.

    python benchmarks/gpu_check.py                 # on the GPU machine ($OUT set there)
    python benchmarks/gpu_check.py --dry-run --out /tmp/check
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the methods live beside this script
from gpu_linear_cross_entropy import (
    LMLOSS_BACKENDS,
    METHODS,
    HelpFormatter,
    error_text,
    errors,
    floor_products,
    free,
    make_inputs,
    measure,
    method_fn,
    timed,
    truth,
)

REPO = Path(__file__).resolve().parents[1]
PHASES = ("install", "env", "ceilings", "correctness", "methods", "sweep", "tests")
WORKER_PHASES = ("env", "ceilings", "correctness", "methods", "sweep")
SHAPES = {"llama3-8b": (8192, 4096, 128_256), "gemma2-2b": (8192, 2304, 256_000)}
DRY_SHAPES = {"llama3-8b": (16, 32, 130), "gemma2-2b": (12, 24, 257)}  # the interpreter: ~N programs
SWEEP_CHUNKS = (1024, 2048, 4096, 8192)
DRY_SWEEP_CHUNKS = (4, 8)
# Seconds per phase (each also ends at the whole check's deadline).
BUDGETS = dict(install=45, env=15, ceilings=15, correctness=40, methods=150, sweep=40, tests=100)
LOSS_RTOL = 1e-3
# A gradient passes when its relative error against the truth is at most 1.25x the naive
# bf16 path's plus half a bf16 epsilon (one more rounding of the output): lmloss may round
# differently, never much worse.
GRAD_SLACK, GRAD_MARGIN = 1.25, 2.0**-8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels under the interpreter")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu-check-out)")
    parser.add_argument("--wheels", default=str(REPO / "gpu-wheels"), help="wheels to install (default gpu-wheels/)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check (default 330)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--shapes", default=None, help="comma-separated NxDxV for 'methods' and 'sweep' "
                        "(default: the Llama-3 8B and Gemma-2 2B heads; tiny ones with --dry-run)")  # fmt: skip
    parser.add_argument("--ignore", type=float, default=0.0, help="ignored targets' fraction (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.phase_list = [p for p in args.phases.split(",") if p]
    args.method_list = [m for m in args.methods.split(",") if m]
    for kind, given, known in (("phase", args.phase_list, PHASES), ("method", args.method_list, METHODS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {kind}(s) {unknown}; choose from {', '.join(known)}")
    try:
        args.shape_map = parse_shapes(args.shapes) if args.shapes else (DRY_SHAPES if args.dry_run else SHAPES)
    except ValueError as error:
        parser.error(str(error))
    if args.budget <= 0:
        parser.error(f"--budget must be positive seconds, got {args.budget}")
    args.out = Path(args.out or os.environ.get("OUT") or "gpu-check-out")
    return args


def parse_shapes(text: str) -> dict[str, tuple[int, int, int]]:
    """``"8192x4096x128256,..."`` -> ``{label: (N, D, V)}`` (the known heads keep their names)."""
    names = {shape: label for label, shape in (*SHAPES.items(), *DRY_SHAPES.items())}
    shapes = {}
    for item in filter(None, text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r} is not NxDxV with positive sizes (e.g. 8192x4096x128256)")
        shape = (int(parts[0]), int(parts[1]), int(parts[2]))
        shapes[names.get(shape, item)] = shape
    return shapes


class Tee:
    """Writes what the parent prints to the console and to ``check.log``."""

    def __init__(self, path: Path) -> None:
        self.console, self.file = sys.stdout, path.open("w")

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()


class Rows:
    """Appends result rows to ``rows.jsonl`` at once, so a killed process loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, phase: str, name: str, **fields: Any) -> dict:
        row = {"phase": phase, "name": name, **fields, "at": round(time.time(), 2)}  # when: where time went
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"[{phase}] {name}: {json.dumps(fields, default=str)[:300]}", flush=True)
        return row

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# --- the parent: install, worker, tests, table ------------------------------------------


def child_env(site: Path | None, dry_run: bool) -> dict[str, str]:
    """The installed wheels first, then the repository's ``src`` (so lmloss imports even
    without its wheel), then what was there."""
    paths = ([str(site)] if site else []) + [str(REPO / "src")]
    old = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])), "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def install(args: argparse.Namespace, rows: Rows, timeout: float) -> Path | None:
    """``pip install --no-index --no-deps`` the carried wheels into a temporary folder."""
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if not wheels:
        rows.add("install", "wheels", skipped=f"no wheels in {args.wheels} (run `make gpu-wheels`)")
        return None
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, wheels)]  # fmt: skip
    start = time.monotonic()
    with (args.out / "install.log").open("w") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    rows.add("install", "wheels", rc=rc, wheels=[w.name for w in wheels], s=round(time.monotonic() - start, 1))
    return site if rc == 0 else None


def run_worker(args: argparse.Namespace, env: dict[str, str], deadline: float) -> None:
    phases = [p for p in args.phase_list if p in WORKER_PHASES]
    if not phases:
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(args.out), "--deadline",
           str(deadline), "--phases", ",".join(phases), "--methods", ",".join(args.method_list),
           "--ignore", str(args.ignore), "--seed", str(args.seed), "--shapes", format_shapes(args.shape_map),
           *(["--dry-run"] if args.dry_run else [])]  # fmt: skip
    with (args.out / "worker.log").open("w") as log:
        try:
            done = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, deadline - time.time()) + 20)  # fmt: skip
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = "killed at its deadline"
    if rc != 0:
        Rows(args.out / "rows.jsonl").add("worker", "exit", error=f"worker ended with {rc}; see worker.log")


def format_shapes(shapes: dict[str, tuple[int, int, int]]) -> str:
    return ",".join("x".join(map(str, shape)) for shape in shapes.values())


def cuda_tests(root: Path, base: Path = REPO) -> list[str]:
    """Node ids (relative to ``base``) of tests under ``root`` whose decorators mention CUDA
    (``skipif(not torch.cuda...)``, a ``cuda`` mark): the tests only a GPU machine runs."""
    ids = []
    for path in sorted(root.rglob("test_*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or not node.name.startswith(("test", "Test")):
                continue
            decorators = [ast.get_source_segment(source, d) or "" for d in node.decorator_list]
            if any("cuda" in d.lower() for d in decorators):
                ids.append(f"{path.relative_to(base)}::{node.name}")
    return ids


def run_tests(args: argparse.Namespace, env: dict[str, str], rows: Rows, timeout: float) -> None:
    selection = ["tests/fused/test_triton.py", *cuda_tests(REPO / "tests")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *selection]
    if args.dry_run:
        cmd.append("--collect-only")  # the interpreter's copy of these runs in the ordinary suite
    start = time.monotonic()
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}  # test_triton.py sets it in its own child
    with (args.out / "tests.log").open("w") as log:
        try:
            done = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = [line for line in (args.out / "tests.log").read_text().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    rows.add("tests", "pytest", rc=rc, summary=summary[:200], selection=selection, s=round(time.monotonic() - start, 1),
             collect_only=args.dry_run)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    start = time.time()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("rows.jsonl", "results.json", "table.md"):
        (args.out / name).unlink(missing_ok=True)
    sys.stdout = Tee(args.out / "check.log")  # type: ignore[assignment]
    rows = Rows(args.out / "rows.jsonl")
    site = None
    if "install" in args.phase_list:
        site = install(args, rows, min(BUDGETS["install"], deadline - time.time()))
    env = child_env(site, args.dry_run)
    testing = "tests" in args.phase_list
    # The tests keep their own share of the budget: the worker stops before it.
    run_worker(args, env, deadline - (BUDGETS["tests"] if testing else 0))
    if testing:
        left = deadline - time.time()
        if left > 10:
            run_tests(args, env, rows, left)
        else:
            rows.add("tests", "pytest", skipped="budget exhausted")
    results = rows.read()
    failures = verdicts(results)
    table = render(results, args, time.time() - start)
    report = {"dry_run": args.dry_run, "failures": failures, "rows": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "table.md").write_text(table)
    if site:
        shutil.rmtree(site, ignore_errors=True)
    print("\n" + table, flush=True)
    return 1 if failures else 0


# --- the worker: everything that touches torch ------------------------------------------


def worker_main(args: argparse.Namespace) -> int:
    rows = Rows(args.out / "rows.jsonl")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        rows.add("env", "device", error="no CUDA device (use --dry-run on a CPU machine)")
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = args.shape_map
    phases: list[tuple[str, Callable[[], None]]] = [
        ("env", lambda: env_phase(rows, device)),
        ("ceilings", lambda: ceilings_phase(rows, device, args.dry_run)),
        ("correctness", lambda: correctness_phase(rows, device, args)),
        ("methods", lambda: methods_phase(rows, device, args, shapes)),
        ("sweep", lambda: sweep_phase(rows, device, args, shapes)),
    ]
    for name, run in phases:
        if name not in args.phase_list:
            continue
        if time.time() >= args.deadline:
            rows.add(name, "phase", skipped="budget exhausted")
            continue
        args.phase_deadline = min(args.deadline, time.time() + BUDGETS[name])
        try:
            run()
        except Exception as error:  # a broken phase must not take the later ones with it
            traceback.print_exc()
            rows.add(name, "phase", error=error_text(error))
        free(device)
    return 0


def env_phase(rows: Rows, device: Any) -> None:
    import torch
    import triton

    import lmloss

    info = dict(torch=torch.__version__, triton=triton.__version__, lmloss=lmloss.__version__,
                lmloss_from=str(Path(lmloss.__file__).parent), python=sys.version.split()[0],
                triton_interpret=os.environ.get("TRITON_INTERPRET"))  # fmt: skip
    for module in ("transformers", "liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            info[module] = version(module.replace("_", "-"))
        except Exception as error:
            info[module] = f"not installed ({type(error).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, sms=props.multi_processor_count, mem_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)  # fmt: skip
    else:
        info["device"] = "cpu (dry run)"
    rows.add("env", "versions", **info)
    for name, probe in api_probes(device).items():
        try:
            probe()
            rows.add("env", f"api {name}", ok=True)
        except Exception as error:
            rows.add("env", f"api {name}", ok=False, error=error_text(error))


def api_probes(device: Any) -> dict[str, Callable[[], Any]]:
    """The PyTorch calls lmloss makes that older or CPU builds may lack."""
    import torch
    import torch.nn.functional as F

    a = torch.randn(16, 8, device=device).bfloat16()
    b = torch.randn(32, 8, device=device).bfloat16()
    z = torch.empty(16, 32, device=device)

    def linear_ce() -> None:
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise AttributeError(f"not in torch {torch.__version__} (2.13+); lmloss only feature-detects it")

    def log_softmax_in_place() -> None:
        """The chunked backend and distillation overwrite logits with their log-softmax
        (a private op, its output aliasing its input): same values as out of place?"""
        x = torch.randn(4, 130_000, device=device) * 3
        want = torch.log_softmax(x, dim=1)
        torch.ops.aten._log_softmax.out(x, 1, False, out=x)
        if not torch.allclose(x, want, rtol=1e-5, atol=1e-5):
            raise AssertionError(f"differs by {float((x - want).abs().max()):.2e}")

    def triton_backend() -> None:
        from lmloss.fused.triton import triton_backend  # noqa: F401

    return {
        "mm(out_dtype=float32)": lambda: torch.mm(a, b.t(), out_dtype=torch.float32),
        "mm(out_dtype, out=)": lambda: torch.mm(a, b.t(), out_dtype=torch.float32, out=z),
        "addmm(out_dtype, out=)": lambda: torch.addmm(z, a, b.t(), out_dtype=torch.float32, out=z),
        "get_autocast_dtype": lambda: torch.get_autocast_dtype(device.type),
        "_log_softmax.out in place": log_softmax_in_place,
        "F.linear_cross_entropy": linear_ce,
        "lmloss.fused.triton import": triton_backend,
    }


def ceilings_phase(rows: Rows, device: Any, dry_run: bool) -> None:
    import torch

    n = 64 if dry_run else 8192
    left = torch.randn(n, n, device=device).bfloat16()  # random data: zeros run faster
    right = torch.randn(n, n, device=device).bfloat16()
    t = timed(lambda: left @ right, device, dry_run)
    rows.add("ceilings", f"bf16 matmul {n}^3", tflops=2 * n**3 / t["ms"] / 1e9, **t)
    count = 2**18 if dry_run else 2**30  # float32 elements: 4 GiB read + 4 GiB written
    src, dst = torch.randn(count, device=device), torch.empty(count, device=device)
    t = timed(lambda: dst.copy_(src), device, dry_run)
    rows.add("ceilings", "copy", tb_s=2 * 4 * count / t["ms"] / 1e9, **t)


def correctness_phase(rows: Rows, device: Any, args: argparse.Namespace) -> None:
    """Each lmloss backend on a slice against float64 truth, beside the naive bf16 path."""
    import torch

    shape = DRY_SHAPES["llama3-8b"] if args.dry_run else (1024, *SHAPES["llama3-8b"][1:])
    h, w, y = make_inputs(shape, device, ignore=0.1, seed=args.seed + 1)
    want = truth(h, w, y, torch.float64)
    for name in ("naive", "reference", *LMLOSS_BACKENDS):
        if time.time() > args.phase_deadline:
            rows.add("correctness", name, skipped="budget exhausted")
            continue
        try:
            loss = method_fn(name, device)(h, w, y)  # type: ignore[operator]
            dh, dw = torch.autograd.grad(loss, (h, w))
            rows.add("correctness", name, shape=shape, truth="float64", **errors(loss, dh, dw, want))
        except Exception as error:
            rows.add("correctness", name, shape=shape, error=error_text(error))
        free(device)


def methods_phase(rows: Rows, device: Any, args: argparse.Namespace, shapes: dict) -> None:
    """Every method on the same inputs, per shape; the phase's time split between shapes."""
    phase_deadline = args.phase_deadline
    for i, (label, shape) in enumerate(shapes.items()):
        shape_deadline = min(phase_deadline, time.time() + (phase_deadline - time.time()) / (len(shapes) - i))
        try:
            shape_methods(rows, device, args, label, shape, shape_deadline)
        except Exception as error:  # e.g. the inputs or the truth out of memory: the next shape still runs
            traceback.print_exc()
            rows.add("methods", "shape", error=error_text(error), shape=shape, shape_name=label)
        free(device)


def shape_methods(rows: Rows, device: Any, args: argparse.Namespace, label: str, shape: tuple, deadline: float) -> None:
    import torch

    h, w, y = make_inputs(shape, device, args.ignore, args.seed)
    want = truth(h, w, y, torch.float32)
    free(device)
    flops = 6.0 * math.prod(shape)
    for name in args.method_list:
        common = {"shape": shape, "shape_name": label}
        if time.time() > deadline:
            rows.add("methods", name, skipped="budget exhausted", **common)
            continue
        fn = None if name == "floor" else method_fn(name, device)
        if isinstance(fn, str):
            rows.add("methods", name, skipped=fn.removeprefix("skipped: "), **common)
            continue
        try:
            if fn is None:
                result = timed(floor_products(h, w), device, args.dry_run)
            else:
                result = measure(fn, h, w, y, device, args.dry_run)
                loss = fn(h, w, y)
                dh, dw = torch.autograd.grad(loss, (h, w))
                result.update(errors(loss, dh, dw, want))
                del loss, dh, dw
            rows.add("methods", name, tflops=flops / result["ms"] / 1e9, **common, **result)
        except Exception as error:  # an OOM or a missing feature is a row, not the end
            rows.add("methods", name, error=error_text(error), **common)
        del fn
        free(device)


def sweep_phase(rows: Rows, device: Any, args: argparse.Namespace, shapes: dict) -> None:
    """``chunk_size`` of the ``triton`` backend at the first shape."""
    label, shape = next(iter(shapes.items()))
    h, w, y = make_inputs(shape, device, args.ignore, args.seed)
    for chunk in DRY_SWEEP_CHUNKS if args.dry_run else SWEEP_CHUNKS:
        name = f"triton chunk_size={chunk}"
        if time.time() > args.phase_deadline:
            rows.add("sweep", name, skipped="budget exhausted", shape=shape, shape_name=label)
            continue
        try:
            fn = method_fn("triton", device, chunk_size=chunk)
            result = measure(fn, h, w, y, device, args.dry_run)  # type: ignore[arg-type]
            rows.add("sweep", name, shape=shape, shape_name=label, chunk_size=chunk,
                     tflops=6.0 * math.prod(shape) / result["ms"] / 1e9, **result)  # fmt: skip
        except Exception as error:
            rows.add("sweep", name, shape=shape, shape_name=label, error=error_text(error))
        free(device)


# --- verdicts and the table -------------------------------------------------------------


def verdicts(rows: list[dict]) -> list[str]:
    """Marks each lmloss row ``check``: ``ok`` when the loss is within ``LOSS_RTOL`` of the
    truth and each gradient's error is at most ``GRAD_SLACK`` times the naive bf16 path's
    (same phase and shape) plus ``GRAD_MARGIN``; without a naive row the gradients are
    left unchecked (said so). Returns the failures: lmloss checks and the tests."""
    failures = []
    naive = {(r["phase"], str(r.get("shape"))): r for r in rows if r["name"] == "naive" and "loss_err" in r}
    for r in rows:
        if r["phase"] not in ("correctness", "methods") or r["name"] not in (*LMLOSS_BACKENDS, "reference"):
            continue
        if "error" in r:
            r["check"] = "FAIL: " + r["error"]
        elif "loss_err" in r:
            base = naive.get((r["phase"], str(r.get("shape"))))
            bad = [] if math.isfinite(r["loss_err"]) and r["loss_err"] <= LOSS_RTOL else ["loss"]
            bounds = {} if base is None else {key: GRAD_SLACK * base[key] + GRAD_MARGIN for key in ("dh_err", "dw_err")}
            bad += [key[:2] for key, bound in bounds.items() if not (math.isfinite(r[key]) and r[key] <= bound)]
            r["check"] = "FAIL: " + ",".join(bad) if bad else "ok" if base else "ok (loss; no naive row for grads)"
        if r.get("check", "").startswith("FAIL"):
            failures.append(f"{r['phase']} {r['name']} {r.get('shape')}: {r['check']}")
    for r in rows:
        if r["phase"] == "tests" and r.get("rc") not in (0, None):
            failures.append(f"tests: {r.get('summary')}")
    return failures


def _num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _status(r: dict) -> str | None:
    if "error" in r:
        return f"error: {r['error']}"
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return None


def render(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    """The markdown report: environment, ceilings, correctness, each shape, sweep, tests."""
    env = next((r for r in rows if r["phase"] == "env" and r["name"] == "versions"), {})
    head = "DRY RUN (CPU, interpreter; timings mean nothing)" if args.dry_run else env.get("device", "?")
    versions = (f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, lmloss {env.get('lmloss', '?')} "
                f"({env.get('lmloss_from', '?')}), liger-kernel {env.get('liger_kernel', '?')}, "
                f"cut-cross-entropy {env.get('cut_cross_entropy', '?')}; {seconds:.0f} s in all.")  # fmt: skip
    out = [f"# lmloss GPU check: {head}", "", versions, ""]
    apis = [f"{r['name'][4:]}: {'ok' if r.get('ok') else str(r.get('error'))[:90]}"
            for r in rows if r["name"].startswith("api ")]  # fmt: skip
    if apis:
        out += ["APIs: " + "; ".join(apis), ""]
    for r in rows:
        if r["phase"] in ("install", "worker", "tests") or r["name"] == "phase":
            detail = _status(r) or f"rc {r.get('rc')} {r.get('summary', '')} ({r.get('s', '?')} s)"
            out.append(f"- {r['phase']} {r['name']}: {detail}")
    for r in (r for r in rows if r["phase"] == "ceilings"):
        value = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r.get('tb_s', 0):.2f} TB/s"
        out.append(f"- ceiling {r['name']}: {_status(r) or value}")
    checked = [r for r in rows if r["phase"] == "correctness" and r["name"] != "phase"]
    if checked:
        out += ["", f"## Correctness: {checked[0].get('shape')} against float64 truth", "",
                "| method | loss | loss rel err | dh rel err | dW rel err | check |",
                "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in checked:
        formats = (("loss", ".6f"), ("loss_err", ".1e"), ("dh_err", ".1e"), ("dw_err", ".1e"))
        cells = _status(r) or " | ".join(_num(r.get(k), f) for k, f in formats)
        out.append(f"| {r['name']} | {cells} | {r.get('check', '')} |")
    timed_rows = [r for r in rows if r["phase"] == "methods" and "shape_name" in r]  # not a skipped phase
    shapes = dict.fromkeys((r["shape_name"], tuple(r["shape"])) for r in timed_rows)
    for label, shape in shapes:
        out += method_table(rows, label, shape, args)
    sweep = [r for r in rows if r["phase"] == "sweep" and r["name"] != "phase"]
    if sweep:
        out += ["", "## Sweep: triton chunk_size", "", "| setting | ms | TFLOP/s eff. | peak extra GiB |",
                "|---|---:|---:|---:|"]  # fmt: skip
        for r in sweep:
            cells = _status(r) or f"{r['ms']:.2f} | {r['tflops']:.0f} | {_num(r.get('peak_gib'), '.2f')}"
            out.append(f"| {r['name']} | {cells} |")
    failures = verdicts(rows)
    out += ["", "FAILED: " + "; ".join(failures) if failures else "All lmloss checks passed.", ""]
    return "\n".join(out)


def method_table(rows: list[dict], label: str, shape: tuple, args: argparse.Namespace) -> list[str]:
    n, d, v = shape
    mine = [r for r in rows if r["phase"] == "methods" and r.get("shape_name") == label]
    floor = next((r["ms"] for r in mine if r["name"] == "floor" and "ms" in r), None)
    out = ["", f"## {label}: N={n} D={d} V={v}, bf16, {args.ignore:.0%} ignored, forward+backward (float32 truth)", "",
           ("| method | ms | TFLOP/s eff. | floor/time | peak extra GiB | loss rel err | dh rel err | dW rel err "
            "| check |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in mine:
        status = _status(r)
        if status:
            out.append(f"| {r['name']} | {status} | | | | | | | {r.get('check', '')} |")
            continue
        ratio = _num(floor / r["ms"] if floor else None, ".2f")
        errs = " | ".join(_num(r.get(k), ".1e") for k in ("loss_err", "dh_err", "dw_err"))
        out.append(f"| {r['name']} | {r['ms']:.2f} | {r['tflops']:.0f} | {ratio} | {_num(r.get('peak_gib'), '.2f')} | "
                   f"{errs} | {r.get('check', '')} |")  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
