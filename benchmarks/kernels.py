"""The sync's building blocks on one device, against the copy floor: no vLLM, no Ray.

For a Qwen2-shaped model in vLLM's kernel layout (fused qkv / gate_up), times
- the floor: one device-to-device copy of the model's bytes;
- trainer packing: checkpoint tensors (q, k, v, gate, up, ...) into one flat bucket,
  batched (``pack_bucket``) and one copy per tensor;
- the bucket checksum (``checksums``) and the parameter fingerprint (``digest_tensors``);
- the engine's apply: bucket views into the parameters, batched (``copy_tensors``, as
  ``worker_ext`` does) and one ``copy_`` per parameter (as vLLM's
  ``reload_weights(is_checkpoint_format=False)``).

    python -m benchmarks.kernels --shape 0.5b --rounds 20      # GPU, or CPU if none
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from benchmarks.baselines import summary
from benchmarks.meta import commit, run_meta

app = typer.Typer(add_completion=False)


def kernel_shapes(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                  vocab_size: int, **_: object) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(vLLM parameter, shapes of the checkpoint tensors stacked into it), Qwen2 layout."""
    hd = hidden // heads
    out: list[tuple[str, list[tuple[int, ...]]]] = [
        ("model.embed_tokens.weight", [(vocab_size, hidden)])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.qkv_proj.weight",
             [(heads * hd, hidden), (kv_heads * hd, hidden), (kv_heads * hd, hidden)]),
            (p + "self_attn.qkv_proj.bias", [(heads * hd,), (kv_heads * hd,), (kv_heads * hd,)]),
            (p + "self_attn.o_proj.weight", [(hidden, heads * hd)]),
            (p + "mlp.gate_up_proj.weight", [(intermediate, hidden), (intermediate, hidden)]),
            (p + "mlp.down_proj.weight", [(hidden, intermediate)]),
            (p + "input_layernorm.weight", [(hidden,)]),
            (p + "post_attention_layernorm.weight", [(hidden,)]),
        ]
    out.append(("model.norm.weight", [(hidden,)]))
    return out


def _time(fn, rounds: int, device) -> dict[str, float]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    xs = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        xs.append(time.perf_counter() - t)
    return summary(xs)


@app.command()
def main(shape: str = typer.Option("0.5b"), rounds: int = typer.Option(20, min=1),
         out: Path = typer.Option(None)) -> None:
    import torch

    from benchmarks.run import SHAPES
    from weightsync.transport.packing import (
        checksums,
        copy_split,
        copy_tensors,
        digest_tensors,
        pack_bucket,
        plan_buckets,
        unpack_bucket,
    )
    from weightsync.types import TensorSpec

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    layout = kernel_shapes(**SHAPES[shape])
    g = torch.Generator(device=device).manual_seed(0)
    parts = {name: [torch.randn(s, generator=g, device=device).to(dtype) for s in shapes]
             for name, shapes in layout}
    params = {name: torch.cat(ts) for name, ts in parts.items()}  # the engine's parameters
    specs = [TensorSpec(name=n, dtype="bfloat16", shape=tuple(p.shape)) for n, p in params.items()]
    plan = plan_buckets(specs, 1 << 40, 1)  # one bucket, as the colocated fast path sends
    bucket = plan.buckets[0]
    buf = pack_bucket(bucket, parts, device)
    srcs = [t for _, t in unpack_bucket(bucket, buf)]
    dsts = list(params.values())
    split = copy_split(dsts, srcs)
    views: dict = {}
    nbytes = buf.numel()
    assert all(torch.equal(v, p) for v, p in zip(srcs, dsts, strict=True))

    def pack_per_tensor() -> None:
        for slot in bucket.slots:
            view = buf[slot.offset:slot.offset + slot.nbytes].view(dtype).view(slot.shape)
            r = 0
            for p in parts[slot.name]:
                view[r:r + p.shape[0]].copy_(p)
                r += p.shape[0]

    def apply_per_param() -> None:
        for d, v in zip(dsts, srcs, strict=True):
            d.copy_(v)

    src = torch.empty_like(buf)
    res = {
        "meta": run_meta("kernels", shape=shape),
        "commit": commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "shape": shape, "bytes": nbytes, "params": len(dsts),
        "checkpoint_tensors": sum(len(v) for v in parts.values()), "rounds": rounds,
        "floor_copy": _time(lambda: src.copy_(buf), rounds, device),
        "pack_batched": _time(lambda: pack_bucket(bucket, parts, device, out=buf, views=views),
                              rounds, device),
        "pack_per_tensor": _time(pack_per_tensor, rounds, device),
        "checksum": _time(lambda: checksums([buf]), rounds, device),
        "apply_batched": _time(lambda: copy_tensors(dsts, srcs, split), rounds, device),
        "apply_per_param": _time(apply_per_param, rounds, device),
        "fingerprint": _time(lambda: digest_tensors(dsts), rounds, device),
    }
    res["floor_GBps"] = 2 * nbytes / res["floor_copy"]["p50"] / 1e9
    typer.echo(json.dumps(res, indent=1))
    out = out or Path("benchmarks/results") / f"kernels-{device.type}-{shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    app()
