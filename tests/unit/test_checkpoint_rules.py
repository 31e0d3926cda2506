"""A checkpoint is refused whole or loaded whole (issue 28): ``weightsync.checkpoint`` applies
safetensors' own header rules, so a file it accepts is a file safetensors loads, and a file
safetensors refuses is refused here, before any engine pauses, as a ``ManifestError`` (422).

Each malformed file is also given to ``safetensors.safe_open`` to show that the rule is
safetensors' own; the few files safetensors loads but we refuse are listed apart, with why.
"""

from __future__ import annotations

import json
import random
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsync.checkpoint import MAX_JSON_DEPTH, read_checkpoint, read_header
from weightsync.errors import ManifestError
from weightsync.types import DTYPE_ITEMSIZE


def _write(path: Path, header: dict | None = None, data: bytes = b"", raw: bytes | None = None
           ) -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _safetensors_loads(path: Path) -> bool:
    """Whether safetensors itself opens the file and reads every tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open, not a dict
                f.get_tensor(name)
        return True
    except Exception:  # noqa: BLE001 - SafetensorError and friends: "refused"
        return False


def _t(shape=(1,), offsets=(0, 4), dtype="F32", **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


W4 = b"\0" * 4
_ENTRY = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]'  # + extra fields + "}}"
DEEP = 100_000

# (id, header, data, raw, what the error says): every one of these safetensors refuses too
MALFORMED = [
    # issue 28, finding 2
    ("overlapping offsets", {"a": _t(), "b": _t()}, W4, None, "overlaps the tensor before it"),
    ("shifted offsets (gap)", {"a": _t(offsets=(4, 8))}, b"\0" * 8, None, "unused byte"),
    ("gap between tensors", {"a": _t(), "b": _t(offsets=(8, 12))}, b"\0" * 12, None,
     "unused byte"),
    ("trailing bytes", {"a": _t()}, b"\0" * 8, None, "trailing bytes"),
    ("truncated data", {"a": _t(shape=(2,), offsets=(0, 8))}, W4, None, "truncated"),
    ("non-string __metadata__ value", {"__metadata__": {"x": 1}, "a": _t()}, W4, None,
     "__metadata__"),
    ("__metadata__ an array", {"__metadata__": [], "a": _t()}, W4, None, "__metadata__"),
    ("__metadata__ nested object", {"__metadata__": {"x": {"y": "z"}}, "a": _t()}, W4, None,
     "__metadata__"),
    ("string shape", {"a": _t(shape=("1",))}, W4, None, "shape must be an array of non-neg"),
    ("float offsets", {"a": _t(offsets=(0.0, 4.0))}, W4, None, "data_offsets must be"),
    ("string offsets", {"a": _t(offsets=("0", "4"))}, W4, None, "data_offsets must be"),
    ("shape 1e400", None, W4, _ENTRY.replace(b"[1]", b"[1e400]") + b"}}", "out of range"),
    (f"{DEEP}-deep JSON", None, b"", b"[" * DEEP + b"]" * DEEP, "nested deeper"),
    (f"{DEEP}-deep JSON in an entry", None, W4,
     _ENTRY + b',"x":' + b"[" * DEEP + b"]" * DEEP + b"}}", "nested deeper"),
    # the rest of safetensors' rules
    ("float shape 1.0", {"a": _t(shape=(1.0,))}, W4, None, "shape must be"),
    ("boolean shape", {"a": _t(shape=(True,))}, W4, None, "shape must be"),
    ("negative shape", {"a": _t(shape=(-1,))}, W4, None, "shape must be"),
    ("shape -0 (a float to serde_json)", None, b"",
     b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', "shape must be"),
    ("shape 2**64", {"a": _t(shape=(2 ** 64,), offsets=(0, 0))}, b"", None, "shape must be"),
    ("shape overflowing 64 bits before a 0", {"a": _t(shape=(2 ** 40, 2 ** 40, 0),
                                                     offsets=(0, 0))}, b"", None, "overflows"),
    ("shape a string", {"a": _t(shape="1")}, W4, None, "shape must be"),
    ("three offsets", {"a": _t(offsets=(0, 4, 4))}, W4, None, "two non-negative"),
    ("one offset", {"a": _t(offsets=(0,))}, W4, None, "two non-negative"),
    ("reversed offsets", {"a": _t(shape=(0,), offsets=(4, 0))}, W4, None, "do not hold"),
    ("offsets not matching the shape", {"a": _t(shape=(2,))}, W4, None, "do not hold"),
    ("unknown dtype", {"a": _t(dtype="F31")}, W4, None, "dtype 'F31' is not one of"),
    ("dtype not a string", {"a": _t(dtype=4)}, W4, None, "dtype"),
    ("entry missing dtype", {"a": {"shape": [1], "data_offsets": [0, 4]}}, W4, None,
     "missing dtype"),
    ("entry a string", {"a": "x"}, b"", None, "not a string"),
    ("header an array", None, b"", b"[]", "not a JSON object"),
    ("NaN", None, W4, _ENTRY + b',"x":NaN}}', "NaN is not JSON"),
    ("400-digit integer", None, W4, _ENTRY + b',"x":' + b"1" * 400 + b"}}", "out of range"),
    ("lone surrogate in a name", None, W4,
     b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "surrogate"),
    ("UTF-8 byte order mark", None, b"", b"\xef\xbb\xbf{}", "unreadable JSON"),
    ("UTF-16", None, b"", "{}".encode("utf-16"), "unreadable JSON"),
    ("NUL padding", None, b"", b"{}\0\0", "unreadable JSON"),
    (f"{MAX_JSON_DEPTH + 1} levels deep", None, W4,
     _ENTRY + b',"x":' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}}",
     "nested deeper"),
]

# safetensors loads these; we refuse them on purpose (see ``parse_header``)
STRICTER = [
    ("a repeated tensor name (which entry is meant?)", None, W4,
     b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "appears twice"),
    ("an entry written as an array", None, W4, b'{"a":["F32",[1],[0,4]]}', "expected an object"),
    ("an empty tensor name (TensorSpec: 1-1024 characters)", {"": _t()}, W4, None, "name"),
    ("9 dimensions (TensorSpec: at most 8)", {"a": _t(shape=(1,) * 9)}, W4, None, "shape"),
    ("a dtype weightsync does not move (C64)", {"a": _t(dtype="C64", offsets=(0, 8))},
     b"\0" * 8, None, "dtype 'C64' is not one of"),
]


def _case_ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case, header, data, raw, match", MALFORMED, ids=_case_ids(MALFORMED))
def test_a_file_safetensors_refuses_is_refused_here_first(tmp_path, case, header, data, raw,
                                                          match):
    f = _write(tmp_path / "model.safetensors", header, data, raw)
    with pytest.raises(ManifestError, match=match):
        read_header(str(f))
    with pytest.raises(ManifestError, match=match):  # and through the directory, as /reload
        read_checkpoint(str(tmp_path), [str(tmp_path)])
    assert not _safetensors_loads(f), f"safetensors loads {case!r}: the rule is ours alone"


@pytest.mark.parametrize("case, header, data, raw, match", STRICTER, ids=_case_ids(STRICTER))
def test_files_safetensors_loads_but_we_refuse_on_purpose(tmp_path, case, header, data, raw,
                                                          match):
    f = _write(tmp_path / "model.safetensors", header, data, raw)
    assert _safetensors_loads(f)
    with pytest.raises(ManifestError, match=match):
        read_header(str(f))


def test_deep_json_is_refused_in_a_worker_thread_too(tmp_path):
    """The engine host reads headers in a thread (``asyncio.to_thread``)."""
    f = _write(tmp_path / "model.safetensors", raw=b"{" + b'"a":{' * DEEP + b"}" * (DEEP + 1))
    out: list[BaseException] = []

    def read() -> None:
        try:
            read_header(str(f))
        except BaseException as e:  # noqa: BLE001 - inspected below
            out.append(e)

    t = threading.Thread(target=read)
    t.start()
    t.join(30)
    assert len(out) == 1 and isinstance(out[0], ManifestError), out
    assert "nested deeper" in str(out[0])


def test_an_index_whose_weight_map_is_not_names_to_files_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    for weight_map in ([["a", "model-00001-of-00001.safetensors"]], {"a": ["x"]}, {"a": 1},
                       "model-00001-of-00001.safetensors", None):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ManifestError, match="'weight_map' must be an object"):
            read_checkpoint(str(tmp_path), [str(tmp_path)])
    index.write_text(json.dumps({"metadata": {}}))  # no weight_map at all: vLLM's KeyError
    with pytest.raises(ManifestError, match="'weight_map' must be an object"):
        read_checkpoint(str(tmp_path), [str(tmp_path)])
    index.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(ManifestError, match="nested deeper"):
        read_checkpoint(str(tmp_path), [str(tmp_path)])
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert list(read_checkpoint(str(tmp_path), [str(tmp_path)]).specs) == ["a"]


TORCH_DTYPES = [getattr(torch, name) for name in DTYPE_ITEMSIZE]


def test_every_file_safetensors_writes_is_accepted_as_safetensors_reads_it(tmp_path):
    tensors = {f"t.{dt}".replace("torch.", ""): torch.zeros(3, 2, dtype=dt)
               for dt in TORCH_DTYPES}
    tensors.update({"empty": torch.zeros(0), "empty2d": torch.zeros(3, 0, dtype=torch.bfloat16),
                    "scalar": torch.tensor(1.5), "scalar_i64": torch.tensor(7),
                    "big": torch.zeros(1000, 17, dtype=torch.float16)})
    cases = {"all": tensors, "one_scalar": {"s": torch.tensor(2.0)},
             "only_empty": {"e": torch.zeros(0, 4)}, "none": {}}
    for label, ts in cases.items():
        for metadata in (None, {"format": "pt", "note": "x" * 100}):
            f = tmp_path / f"{label}-{metadata is None}.safetensors"
            save_file(ts, str(f), metadata=metadata)
            specs = read_header(str(f))
            with safe_open(str(f), framework="pt") as st:
                theirs = {n: st.get_slice(n) for n in st.keys()}  # noqa: SIM118 - safe_open
                assert set(specs) == set(theirs) == set(ts)
                for name, spec in specs.items():
                    t = st.get_tensor(name)
                    assert spec.shape == tuple(t.shape) == tuple(ts[name].shape)
                    assert spec.dtype == str(t.dtype).removeprefix("torch.")
                    assert spec.nbytes == t.numel() * t.element_size()


@pytest.mark.parametrize("case, header, data, raw", [
    ("__metadata__ null", {"__metadata__": None, "a": _t()}, W4, None),
    ("unknown fields in an entry", {"a": _t(extra={"x": [1, "y", None, 2.5]})}, W4, None),
    ("a 30-digit integer in an unknown field", None, W4, _ENTRY + b',"x":' + b"1" * 30 + b"}}"),
    ("-0 in an unknown field", None, W4, _ENTRY + b',"x":-0}}'),
    (f"{MAX_JSON_DEPTH} levels deep", None, W4,
     _ENTRY + b',"x":' + b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2) + b"}}"),
    ("zero-size tensors sharing offsets", {"a": _t(shape=(0,), offsets=(0, 0)),
                                           "b": _t(shape=(0, 3), offsets=(0, 0)),
                                           "c": _t()}, W4, None),
    ("entries out of offset order", {"b": _t(offsets=(4, 8)), "a": _t()}, b"\0" * 8, None),
    ("whitespace around the header", None, b"", b"  {}    "),
    ("a paired surrogate escape", None, W4,
     b'{"\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
], ids=lambda v: v if isinstance(v, str) else "")
def test_unusual_but_valid_files_are_accepted_by_both(tmp_path, case, header, data, raw):
    f = _write(tmp_path / "model.safetensors", header, data, raw)
    assert _safetensors_loads(f)
    read_header(str(f))


def test_mutated_headers_get_the_same_verdict_as_safetensors(tmp_path):
    """Random damage to offsets, shapes and the data's length: whatever we accept safetensors
    loads, and whatever it refuses we refuse (the verdicts agree on every file)."""
    rng = random.Random(28)
    names = ["a", "b", "c"]
    tried = disagree = 0
    for i in range(300):
        header, at = {}, 0
        for n in names:
            shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
            size = 4 * (1 if not shape else shape[0] * (shape[1] if len(shape) > 1 else 1))
            header[n] = _t(shape=shape, offsets=(at, at + size))
            at += size
        data_len = at
        victim = header[rng.choice(names)]
        kind = rng.randrange(6)
        if kind == 0:
            victim["data_offsets"][rng.randrange(2)] += rng.choice([-4, -1, 1, 4])
        elif kind == 1:
            victim["shape"] = victim["shape"] + [rng.choice([0, 1, 2])]
        elif kind == 2:
            data_len += rng.choice([-4, -1, 1, 8])
        elif kind == 3:
            victim["data_offsets"] = [x + 4 for x in victim["data_offsets"]]
        elif kind == 4:
            victim["dtype"] = rng.choice(["F16", "I64", "U8", "BF16"])
        f = _write(tmp_path / f"m{i}.safetensors", header, b"\0" * max(0, data_len))
        theirs = _safetensors_loads(f)
        try:
            read_header(str(f))
            ours = True
        except ManifestError:
            ours = False
        tried += 1
        disagree += ours != theirs
        assert ours == theirs or not ours, f"we accept what safetensors refuses: {header}"
    assert disagree == 0 and tried == 300
