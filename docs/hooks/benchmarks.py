"""mkdocs hook: the benchmarks page is generated from ``benchmarks/results/*.json``.

Nothing on that page is typed by hand: ``on_page_markdown`` replaces the marker
``<!-- results -->`` in ``docs/benchmarks.md`` with one index table (file, benchmark, device,
commit, date, headline) and one section per results file (its configuration, its figures,
its plot), all read from the files at build time, so the page cannot drift from them.
``on_files`` adds the results' JSON and PNG files to the site under ``results/``, so the
plots render and every file is one click away.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = "benchmarks.md"
MARKER = "<!-- results -->"


# ---- small formatters -------------------------------------------------------------------------
def _ms(x: Any, q: str = "p50") -> str:
    """A summary's quantile (seconds) in ms; '' where absent."""
    if isinstance(x, dict):
        x = x.get(q)
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return ""
    v = x * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _scalars(d: dict, keys: list[str] | None = None) -> list[list[str]]:
    keys = keys or [k for k, v in d.items() if isinstance(v, (int, float, str, bool))]
    return [[f"`{k}`", _num(d[k])] for k in keys if k in d and d[k] is not None]


# ---- one renderer per benchmark: (headline, body) ----------------------------------------------
SYNC_PHASES = ["pause", "sleep", "wake_weights", "transfer", "reload", "transfer+reload",
               "fingerprint", "wake_kv", "resume", "total"]


def _sync(d: dict) -> tuple[str, str]:
    runs = d.get("runs") or []
    phases = [p for p in SYNC_PHASES if any(p in (r.get("phases") or {}) for r in runs)]
    rows = []
    for r in runs:
        floor = r.get("floor_device_copy") or r.get("floor_raw_broadcast")
        rows.append([str(r.get("engines")), f"{r.get('bytes', 0) / 1e6:.0f}",
                     str(r.get("layout") or ""),
                     *[_ms((r.get("phases") or {}).get(p)) for p in phases], _ms(r.get("total")),
                     _ms(floor)])
    floor_name = "device-copy floor" if runs and "floor_device_copy" in runs[0] else \
        "raw broadcast floor"
    conf = ", ".join(f"{k} `{d[k]}`" for k in ("shape", "dtype", "ipc", "ipc_direct",
                                                "sleep_level", "apply", "colocated",
                                                "gpu_memory_utilization", "broadcast",
                                                "bucket_mib", "syncs") if d.get(k) is not None)
    body = (f"{conf}. p50 ms: each phase as the engines report it (`EngineSyncReport.seconds`, "
            f"the slowest engine's; *engine total* is its total), *sync wall* the trainer's "
            f"`sync()` call, and the floor measured in the same run over the same bytes:\n\n" +
            _table(["engines", "MB", "layout", *[p if p != "total" else "engine total"
                                                 for p in phases], "sync wall", floor_name],
                   rows))
    heads = []
    for r in runs[:1] + runs[1:][-1:]:
        tr = (r.get("phases") or {}).get("transfer+reload")
        ratio = r.get("ratio_transfer_reload_vs_copy_floor")
        heads.append(f"{r.get('engines')} engine(s): " +
                     (f"transfer+reload {_ms(tr)} ms" if tr else "") +
                     (f" ({ratio:.2f}x the copy floor)" if isinstance(ratio, float) else "") +
                     (", " if tr else "") + f"sync wall {_ms(r.get('total'))} ms")
    native = d.get("baseline_vllm_native_ipc")
    if isinstance(native, dict):
        body += "\n\nvLLM's native IPC API in the same run: " + ", ".join(
            f"{k} {_ms(v)} ms" for k, v in native.items() if isinstance(v, dict) and "p50" in v)
    return "; ".join(heads) + (" (p50)" if heads else ""), body


def _transport(d: dict) -> tuple[str, str]:
    runs = d.get("runs") or []
    rows = [[str(r["receivers"]), _ms(r.get("raw")), _ms(r.get("sender")),
             _ms(r.get("verified")), _num(r.get("verified_vs_raw"))] for r in runs]
    how = f"chain, {d['chain_chunk'] >> 20} MiB chunks" if d.get("chain_chunk") else "gloo"
    body = (f"{d.get('bytes', 0) / 1e6:.0f} MB in {d.get('buckets')} buckets, leg: {how}, "
            f"{d.get('cpus')} CPUs. p50 ms:\n\n" +
            _table(["receivers", "raw gloo broadcast", "sender done", "every receiver verified",
                    "verified ÷ raw"], rows))
    head = ""
    if runs:
        last = runs[-1]
        head = (f"{last['receivers']} receivers: verified {_ms(last.get('verified'))} ms, "
                f"{_num(last.get('verified_vs_raw'))}x the raw broadcast")
    return head, body


def _soak(d: dict) -> tuple[str, str]:
    s = d.get("summary") or {}
    faults = ", ".join(f"{k}: {v}" for k, v in (s.get("faults") or {}).items())
    body = f"seed {d.get('seed')}, forced fault {d.get('forced_fault')}; faults: {faults}\n\n" + \
        _table(["summary", "value"], _scalars(s))
    head = (f"{s.get('rounds')} rounds, worst recovery {_num(s.get('worst_recovery_s'))} s "
            f"(bound {_num(s.get('limit_s'))} s), all consistent: {s.get('all_consistent')}")
    return head, body


def _tp(d: dict) -> tuple[str, str]:
    rows = [[r["bind"], f"{r.get('boot_s', 0):.0f}", _ms((r.get("collective") or {}).get("total")),
             _ms((r.get("chain") or {}).get("total")),
             f"{(r.get('generate') or {}).get('tokens_per_s', 0):.0f}"] for r in d["runs"]]
    body = f"{d.get('fleet')}, {d.get('syncs')} syncs per broadcast kind:\n\n" + _table(
        ["CPU binding", "engines start (s)", "sync p50 ms, collective", "sync p50 ms, chain",
         "generate tok/s (all busy)"], rows)
    head = "; ".join(f"{r['bind']}: {(r.get('generate') or {}).get('tokens_per_s', 0):.0f} tok/s"
                     for r in d["runs"])
    return head, body


def _sharded(d: dict) -> tuple[str, str]:
    rows = [[str(r["ranks"]), f"{r['bytes'] / 1e6:.0f}", _ms(r.get("sync_wall")),
             _ms(r.get("transfer")), _ms(r.get("reload"))] for r in d["runs"]]
    body = _table(["trainer ranks", "MB", "sync wall p50 ms", "transfer p50 ms",
                   "reload p50 ms"], rows)
    return (f"2 ranks ÷ 1 rank: {_num(d.get('ratio_2_vs_1'))}x "
            f"(target {_num(d.get('target_ratio'))}x)"), body


def _kernels(d: dict) -> tuple[str, str]:
    ops = [k for k, v in d.items() if isinstance(v, dict) and "p50" in v]
    body = f"{d.get('bytes', 0) / 1e9:.2f} GB, {d.get('params')} parameters:\n\n" + _table(
        ["operation", "p50 ms", "p95 ms"], [[f"`{k}`", _ms(d[k]), _ms(d[k], "p95")] for k in ops])
    return f"device copy {_ms(d.get('floor_copy'))} ms, checksum {_ms(d.get('checksum'))} ms", body


def _digest(d: dict) -> tuple[str, str]:
    rows = []
    for k in ("floor_read_sum", "floor_copy", "best", "many_digest", "copy_and_digest",
              "copy_and_digest_best"):
        v = d.get(k)
        if isinstance(v, dict):
            rows.append([f"`{k}`", _ms(v.get("seconds", v)), str(v.get("equal", ""))])
    body = f"{d.get('bytes', 0) / 2**30:.0f} GiB:\n\n" + _table(["kernel", "p50 ms", "equal"],
                                                               rows)
    best = d.get("best") or {}
    return f"checksum {_num(best.get('GBps'))} GB/s", body


def _grpo(d: dict) -> tuple[str, str]:
    s = d.get("summary") or {}
    body = f"`{d.get('command')}`\n\n" + _table(["summary", "value"], _scalars(s))
    return (f"reward {_num(s.get('first_reward_mean'))} -> {_num(s.get('last_reward_mean'))}, "
            f"median sync {_ms(s.get('sync_seconds_median'))} ms, "
            f"all syncs verified: {s.get('all_syncs_verified')}"), body


def _tests(d: dict) -> tuple[str, str]:
    tests = d.get("tests") or {}
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t.get("outcome", "?")] = counts.get(t.get("outcome", "?"), 0) + 1
    rows = [[f"`{name.split('::')[-1]}`", t.get("outcome", "?"),
             f"{t.get('seconds', 0):.0f}"] for name, t in tests.items()]
    body = _table(["test", "outcome", "seconds"], rows)
    data = d.get("data") or {}
    for key, title in (("warm_cold", "Warm == cold"), ("fp8", "FP8 warm == cold")):
        if isinstance(data.get(key), dict):
            body += f"\n\n{title}: " + "; ".join(
                f"{k}: max logprob diff {_num(v.get('max_logprob_diff'))}"
                for k, v in data[key].items() if isinstance(v, dict))
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), body


def _graphs(d: dict) -> tuple[str, str]:
    res = d.get("results") or {}
    rows = [[m, _ms(v.get("sync_p50_s")), f"{v.get('tokens_per_s', 0):.0f}"]
            for m, v in sorted(res.items())]
    return ("; ".join(f"{m}: sync {_ms(v.get('sync_p50_s'))} ms" for m, v in sorted(res.items())),
            _table(["mode", "colocated sync p50 ms", "rollout tokens/s"], rows))


def _control(d: dict) -> tuple[str, str]:
    rows, worst = [], 0.0
    for phase, p in (d.get("phases") or {}).items():
        for ep in ("/healthz", "/status"):
            q = p.get(ep) or {}
            rows.append([phase, f"`{ep}`", _num(q.get("p50")), _num(q.get("p99")),
                         _num(q.get("max"))])
            if ep == "/status" and isinstance(q.get("p99"), (int, float)):
                worst = max(worst, q["p99"])
    method = (d.get("meta") or {}).get("method", "")
    return (f"`/status` p99 at most {_num(worst)} ms in every phase",
            (method + "\n\n" if method else "") +
            _table(["phase", "route", "p50 ms", "p99 ms", "max ms"], rows))


def _probe(d: dict) -> tuple[str, str]:
    """Files whose numbers are already milliseconds (``_about`` says so)."""
    keys = [k for k in ("ray_rtt_get_ms", "ray_async_actor_rtt", "engine_rpc_noop",
                        "wake_weights", "wake_kv") if k in d]
    head = ", ".join(f"`{k}` {_num(d[k])} ms" for k in keys)
    return head, (d.get("_about", "") + "\n\n" if d.get("_about") else "") + _table(
        ["field", "value"], _scalars({k: v for k, v in d.items() if k not in ("meta", "_about")}))


def _flat(d: dict) -> tuple[str, str]:
    rows = _scalars({k: v for k, v in d.items() if k != "meta"})
    return "", _table(["field", "value"], rows) if rows else ""


RENDER: dict[str, Callable[[dict], tuple[str, str]]] = {
    "sync": _sync, "transport": _transport, "soak": _soak, "tp-cpu": _tp, "sharded": _sharded,
    "kernels": _kernels, "digest": _digest, "grpo": _grpo, "gpu-suite": _tests,
    "graphs-gpu": _graphs, "control-latency": _control,
    "host-overhead": _probe, "probe-wake": _probe,
}


def render() -> str:
    """The generated part of the benchmarks page."""
    index, sections = [], []
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        meta = doc.get("meta") or {}
        kind = meta.get("benchmark", "")
        try:
            head, body = RENDER.get(kind, _flat)(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # show, never hide
            head, body = "", f"(could not summarise this file: {type(e).__name__}: {e})"
        anchor = path.stem.replace(".", "-")
        date = str(meta.get("date", ""))[:10]
        label = f"{kind}, colocated" if kind == "sync" and doc.get("colocated") else kind
        index.append([f"[`{path.stem}`](#{anchor})", label, str(meta.get("device")),
                      f"`{meta.get('commit')}`", date, head])
        notes = [f"{k.replace('_', ' ')}: {meta[k]}" for k in
                 ("commit_note", "commit_source", "device_source", "date_source", "note")
                 if meta.get(k)]
        versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
        links = [f"[JSON](results/{path.name})"]
        png = path.with_suffix(".png")
        plot = f"\n\n![{path.stem}](results/{png.name})" if png.exists() else ""
        if png.exists():
            links.append(f"[PNG](results/{png.name})")
        sections.append(
            f"### {path.stem} {{#{anchor}}}\n\n"
            f"`benchmarks/results/{path.name}` ({' · '.join(links)}): {kind} on "
            f"{meta.get('device')}, commit `{meta.get('commit')}`, {meta.get('date')}"
            f"{'; ' + versions if versions else ''}.\n"
            + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
            + f"\n{body}{plot}\n")
    return ("## Every results file\n\n" +
            _table(["file", "benchmark", "device", "commit", "date", "headline"], index) +
            "\n\n" + "\n".join(sections))


def on_files(files: Files, config: Any) -> Files:
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".json", ".png"):
            files.append(File.generated(config, f"results/{path.name}",
                                        abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri == PAGE:
        return markdown.replace(MARKER, render())
    return markdown
