"""lmloss bench: one table, peers side by side, the same loss for every method."""

from __future__ import annotations

import re

import pytest

from lmloss.bench import peak_rss_bytes
from lmloss.cli import main


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_prints_one_table_with_matching_losses(capsys):
    assert (
        main(
            [
                "bench",
                "--tokens",
                "48",
                "--repeats",
                "1",
                "--methods",
                "floor,naive,lmloss",
                "--ignored",
                "0.25",
                "--no-memory",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("# qwen2-0.5b head: N=48, D=896, V=151936, float32, cpu")
    rows = table_rows(out)
    assert list(rows) == ["floor", "naive", "lmloss"]
    assert rows["floor"][1] == "1.00x"
    losses = {m: float(r[4]) for m, r in rows.items() if m != "floor"}
    assert losses["lmloss"] == pytest.approx(losses["naive"], rel=1e-5)


def test_bench_memory_column_comes_from_fresh_processes(capsys):
    tokens, chunk = 64, 8
    assert (
        main(
            [
                "bench",
                "--tokens",
                str(tokens),
                "--repeats",
                "1",
                "--methods",
                "lmloss,naive",
                "--chunk-size",
                str(chunk),
            ]
        )
        == 0
    )
    rows = table_rows(capsys.readouterr().out)
    naive, lmloss = float(rows["naive"][3]), float(rows["lmloss"][3])
    # Bounds by construction, not by a machine's kernels: naive must hold the [64, 151936]
    # float32 logits (37 MiB) at once (in backward, their gradient while the weight's
    # gradient is made; in forward, beside the log-softmax); lmloss holds a few [8, 151936]
    # chunks (4.6 MiB each). Each peak is read in its own fresh process, so lmloss, run
    # first, cannot report less because naive's freed memory was reused, nor naive more.
    logits_mib = tokens * 151936 * 4 / 2**20
    assert naive >= logits_mib
    assert 0 < lmloss < logits_mib


def test_bad_method_is_refused():
    with pytest.raises(SystemExit, match=re.escape("unknown method(s) ['fast']")):
        main(["bench", "--methods", "lmloss,fast"])


def test_peak_rss_is_read():
    assert peak_rss_bytes() > 10 * 2**20


def test_floor_of_scored_rows_and_cpu_time_lines(capsys):
    assert (
        main(
            [
                "bench",
                "--tokens",
                "40",
                "--repeats",
                "1",
                "--methods",
                "floor,floor-scored,lmloss",
                "--ignored",
                "0.5",
                "--no-memory",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ["floor", "floor-scored", "lmloss"]
    assert rows["floor-scored"][4] == "-"  # no loss: products only
    # The last lines put each method against the scored-rows floor, from the table's own times.
    against = re.search(r"vs floor-scored \(the products over the scored rows\): lmloss ([0-9.]+)x", out)
    assert against is not None
    expected = float(rows["lmloss"][0]) / float(rows["floor-scored"][0])
    assert float(against.group(1)) == pytest.approx(expected, rel=0.05, abs=0.02)
    cpu = re.search(
        r"CPU time \(median, all threads; x: vs floor-scored\): floor ([0-9.]+) s \(([0-9.]+)x\), "
        r"floor-scored ([0-9.]+) s \(1\.00x\), lmloss ([0-9.]+) s \(([0-9.]+)x\)",
        out,
    )
    assert cpu is not None
    assert float(cpu.group(5)) == pytest.approx(float(cpu.group(4)) / float(cpu.group(3)), rel=0.05, abs=0.02)
