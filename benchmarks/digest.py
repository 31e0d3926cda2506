"""The bucket checksum's CUDA kernel (``transport.digest_cuda``) over launch shapes, against the
read floor (one ``sum`` of the same bytes) and a copy of them. Every shape must give the torch
reductions' values (integer sums: the shape cannot change them).

    python -m benchmarks.digest --gib 2 --out runs/digest.json      # GPU only
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import typer

from benchmarks.baselines import summary
from benchmarks.meta import commit, run_meta

app = typer.Typer(add_completion=False)


def _time(fn, rounds: int) -> dict:
    import torch

    fn()
    out = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return summary(out)


@app.command()
def main(gib: float = typer.Option(2.0), rounds: int = typer.Option(10),
         out: Path = typer.Option(Path("benchmarks/results/digest-gpu.json"))) -> None:
    import torch

    from weightsync.transport.digest_cuda import row_col_sums
    from weightsync.transport.packing import _ROW_WORDS

    n = int(gib * (1 << 30)) // (8 * _ROW_WORDS) * (8 * _ROW_WORDS)
    buf = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    rows = buf.view(torch.int64).view(-1, _ROW_WORDS)
    want = (rows.sum(dim=1), rows.sum(dim=0))
    dst = torch.empty_like(buf)
    res = {"meta": run_meta("digest"), "commit": commit(),
           "device": torch.cuda.get_device_name(0), "bytes": n,
           "floor_read_sum": _time(lambda: rows.sum(), rounds),
           "floor_copy": _time(lambda: dst.copy_(buf), rounds), "shapes": []}
    for band, tile, warps in itertools.product((256, 1024), (4, 8, 16, 32), (4, 8, 16)):
        got = row_col_sums(rows, band, tile, warps)
        ok = got is not None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        t = _time(lambda b=band, t=tile, w=warps: row_col_sums(rows, b, t, w), rounds) \
            if ok else None
        res["shapes"].append({"band": band, "tile": tile, "warps": warps, "equal": ok,
                              "seconds": t, "GBps": n / t["p50"] / 1e9 if t else None})
        typer.echo(json.dumps(res["shapes"][-1]))
    good = [s for s in res["shapes"] if s["equal"]]
    res["best"] = min(good, key=lambda s: s["seconds"]["p50"]) if good else None
    # the checksum of many buffers in one launch (ManyDigests), and the same launch copying
    # each buffer as it reads it: a verified copy in one read of the bytes
    from weightsync.transport.digest_cuda import ManyDigests
    from weightsync.transport.packing import digest_terms

    parts = list(buf.split(n // 16))  # a MoE layer's few large tensors
    want_terms = digest_terms(parts)
    many = ManyDigests(parts)
    fused = ManyDigests(parts, copy_to=list(dst.split(n // 16)))
    dst.zero_()
    res["many_digest"] = {"equal": torch.equal(many.terms(), want_terms),
                          "seconds": _time(many.terms, rounds)}
    res["copy_and_digest"] = {"equal": torch.equal(fused.terms(), want_terms) and
                              torch.equal(dst, buf), "seconds": _time(fused.terms, rounds)}
    typer.echo(json.dumps({k: res[k] for k in ("many_digest", "copy_and_digest")}))
    res["copy_and_digest_shapes"] = []  # its launch shapes (the default is the first row's)
    for band, tile, warps in itertools.product((256, 64, 1024), (8, 4, 16), (4, 8)):
        dst.zero_()
        shaped = ManyDigests(parts, band=band, copy_to=list(dst.split(n // 16)), tile=tile,
                             warps=warps)
        ok = torch.equal(shaped.terms(), want_terms) and torch.equal(dst, buf)
        t = _time(shaped.terms, rounds) if ok else None
        res["copy_and_digest_shapes"].append({"band": band, "tile": tile, "warps": warps,
                                              "equal": ok, "seconds": t})
    good = [s for s in res["copy_and_digest_shapes"] if s["equal"]]
    res["copy_and_digest_best"] = min(good, key=lambda s: s["seconds"]["p50"]) if good else None
    typer.echo(json.dumps({"copy_and_digest_best": res["copy_and_digest_best"]}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    _plot(res, out.with_suffix(".png"))
    typer.echo(json.dumps({k: res[k] for k in ("floor_read_sum", "floor_copy", "best")}))


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [s for s in res["shapes"] if s["equal"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(good)), [s["GBps"] for s in good])
    ax.set_xticks(range(len(good)), [f"{s['band']}/{s['tile']}/{s['warps']}" for s in good],
                  rotation=90, fontsize=7)
    ax.axhline(res["bytes"] / res["floor_read_sum"]["p50"] / 1e9, color="k", ls="--",
               label="torch sum (read floor)")
    ax.set_ylabel("GB/s")
    ax.set_xlabel("band rows / tile rows / warps")
    ax.set_title(f"bucket checksum kernel, {res['bytes'] / 1e9:.2f} GB on {res['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app()
