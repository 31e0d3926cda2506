"""Safetensors checkpoint directories: which files to read, and what their headers say.

Everything that reads a checkpoint a client named goes through here (the control plane's
``/reload``, an engine's reload and its record of the model it started with), so the rules hold
in one place:

- Files are listed with ``os.scandir`` (no glob: a directory called ``gl[ob]*`` is a name, not
  a pattern) and resolved one by one: every file's real path must lie inside a load root when
  roots are given, so a ``model.safetensors`` symlink cannot lead outside them.
- Only regular files are read. Files are opened with ``O_NONBLOCK`` and checked with ``fstat``
  before any read, so a FIFO or device named ``*.safetensors`` is refused at once instead of
  blocking ``open()``.
- A header is read by hand (8-byte length + JSON), bounded by ``max_header_bytes``; no tensor
  data is touched and nothing is memory-mapped. It must pass exactly the rules safetensors' own
  parser applies when the engine loads the file (``parse_header``), so a file accepted here is
  never refused later, after the engines paused.

With a ``model.safetensors.index.json`` only the files its ``weight_map`` names are used, as
vLLM's loader does (a stray ``consolidated.safetensors`` beside shards is not a second copy).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from weightsync.errors import ConfigError, ManifestError
from weightsync.types import DTYPE_ITEMSIZE, TensorSpec

MAX_HEADER_BYTES = 16 << 20  # safetensors' own limit is 100 MB; real headers are < 5 MB
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# serde_json's recursion limit as safetensors' parser meets it: 127 nested arrays/objects, the
# header object itself counted (measured with safetensors 0.8: 128 levels are refused)
MAX_JSON_DEPTH = 127
_USIZE = 1 << 64  # safetensors' shapes and offsets are usize (64-bit)
_I64 = 1 << 63


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory as resolved: its real path, files (real paths) and tensors."""

    directory: str
    files: tuple[str, ...]
    specs: dict[str, TensorSpec]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the files hold (their headers' tensors): what a reload moves."""
        return sum(s.nbytes for s in self.specs.values())


def _inside(real: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([real, r]) == r for r in (os.path.realpath(x) for x in roots))


def resolve_directory(path: str, roots: Sequence[str] | None = None) -> str:
    """The real path of directory ``path``; inside one of ``roots`` unless ``roots`` is None
    (a trusted caller, whose relative path is taken from the working directory).

    Raises ``ConfigError`` (bad input: relative with roots, outside them, not a directory).
    """
    if roots is not None and not roots:
        raise ConfigError("no load roots are configured (WEIGHTSYNC_LOAD_ROOTS): "
                          "only a reload of the original model is allowed")
    if not os.path.isabs(path):
        if roots is not None:  # a client's path: no meaning to guess
            raise ConfigError(f"checkpoint path must be absolute, not {path!r}")
        path = os.path.abspath(path)  # the engine's own model, as vLLM resolved it
    try:
        real = os.path.realpath(path)
        inside = roots is None or _inside(real, roots)
        is_dir = os.path.isdir(real)
    except (ValueError, OSError) as e:  # NUL bytes, unencodable text, over-long names
        raise ConfigError(f"unusable checkpoint path: {e}") from None
    if not inside:
        raise ConfigError(f"{path!r} is outside the allowed load roots {list(roots or ())}")
    if not is_dir:
        raise ConfigError(f"{path!r} is not a directory")
    return real


def list_files(directory: str, roots: Sequence[str] | None = None) -> tuple[str, ...]:
    """The real paths of the checkpoint's ``*.safetensors`` files, sorted by name.

    ``directory`` is a real path (``resolve_directory``). Each file is resolved on its own and
    must stay inside ``roots`` (when given) and be a regular file.
    """
    try:
        names = sorted(e.name for e in os.scandir(directory) if e.name.endswith(".safetensors"))
    except OSError as e:
        raise ConfigError(f"cannot list {directory!r}: {e}") from None
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        wanted = _index_files(index, roots)
        missing = sorted(wanted - set(names))
        if missing:
            raise ManifestError(f"{INDEX_FILE} names files that are not there: {missing[:5]}")
        names = [n for n in names if n in wanted]
    if not names:
        raise ManifestError(f"no *.safetensors files in {directory!r}")
    files = []
    for name in names:
        real = os.path.realpath(os.path.join(directory, name))
        if roots is not None and not _inside(real, roots):
            raise ConfigError(f"{name} in {directory!r} resolves to {real!r}, outside the "
                              f"allowed load roots {list(roots)}")
        files.append(real)
    return tuple(files)


def _index_files(index: str, roots: Sequence[str] | None) -> set[str]:
    """The file names an index's ``weight_map`` (tensor name -> file name) names. vLLM and
    transformers read ``weight_map`` so, and fail on anything else: refused here first."""
    weight_map = _read_json(index, MAX_HEADER_BYTES, roots).get("weight_map")
    if not isinstance(weight_map, dict):
        bad: str | None = _json_type(weight_map)
    else:
        bad = next((f"an object holding {_json_type(v)}" for v in weight_map.values()
                    if not isinstance(v, str)), None)
    if bad is not None:
        raise ManifestError(f"{INDEX_FILE}: 'weight_map' must be an object mapping tensor names "
                            f"to file names, not {bad}")
    return set(weight_map.values())


def _open_regular(path: str) -> int:
    """An fd for ``path`` if it is a regular file; never blocks (FIFOs, devices)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ManifestError(f"cannot open {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ManifestError(f"{path!r} is not a regular file")
    return fd


def _read_exactly(fd: int, n: int, path: str) -> bytes:
    chunks, left = [], n
    while left:
        try:
            chunk = os.read(fd, min(left, 1 << 20))
        except OSError as e:
            raise ManifestError(f"cannot read {path!r}: {e.strerror}") from None
        if not chunk:
            raise ManifestError(f"{path!r} ends early (truncated safetensors file)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_json(path: str, limit: int, roots: Sequence[str] | None) -> dict:
    real = os.path.realpath(path)
    if roots is not None and not _inside(real, roots):
        raise ConfigError(f"{path!r} resolves outside the allowed load roots")
    fd = _open_regular(real)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ManifestError(f"{path!r} is {size} bytes (limit {limit})")
        return _json_object(_read_exactly(fd, size, path), f"{path!r}")
    finally:
        os.close(fd)


def _json_object(raw: bytes, what: str) -> dict:
    """``raw`` as a JSON object, read as safetensors' parser (serde_json) reads it: strict
    UTF-8, no ``NaN``/``Infinity``, numbers in range, nesting bounded; a repeated key is refused
    too (see ``parse_header``). Every refusal is a ``ManifestError``."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_int=_json_int, parse_float=_json_float,
                          parse_constant=_json_constant, object_pairs_hook=_json_pairs)
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: the parser's own stack ran out
        raise ManifestError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # bad UTF-8, bad JSON, a number out of range, a repeated key
        raise ManifestError(f"{what}: unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{what}: not a JSON object")
    _check_tree(data, what)
    return data


def _json_int(text: str) -> int | float:
    """serde_json's integers: ``-0`` is a float, and so is an integer beyond 64 bits."""
    if text == "-0":
        return -0.0
    if len(text) <= 20:
        value = int(text)
        if -_I64 <= value < _USIZE:
            return value
    return _json_float(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: Python reads inf, serde_json "number out of range"
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _json_pairs(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup[:200]!r} appears twice in one object")
    return obj


def _check_tree(data: dict, what: str) -> None:
    """Nesting within ``MAX_JSON_DEPTH``, and every string valid UTF-8 (Python decodes a lone
    surrogate escape such as ``\\ud800``; serde_json refuses it). Iterative: no recursion."""
    todo: list[tuple[object, int]] = [(data, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise ManifestError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            for text in (key, value):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ManifestError(f"{what}: a string holds a lone UTF-16 surrogate "
                                            "escape (not UTF-8)") from None
            if isinstance(value, (dict, list)):
                todo.append((value, depth + 1))


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number with a fraction or exponent",
            type(None): "null"}.get(type(value), type(value).__name__)


def _is_usize(value: object) -> bool:
    return type(value) is int and 0 <= value < _USIZE  # not bool, not float


def read_header(path: str, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorSpec]:
    """Tensor names, dtypes and shapes from one safetensors file's header (``ManifestError`` if
    it is not a regular file, its header is over the bound, or it breaks a rule of
    ``parse_header``)."""
    fd = _open_regular(path)
    try:
        return _header_of(fd, path, max_header_bytes)
    finally:
        os.close(fd)


def _header_of(fd: int, path: str, max_header_bytes: int = MAX_HEADER_BYTES
               ) -> dict[str, TensorSpec]:
    """``read_header`` of a file already open (read from its start, whatever its offset)."""
    os.lseek(fd, 0, os.SEEK_SET)
    size = os.fstat(fd).st_size
    if size < 8:
        raise ManifestError(f"{path!r} is too short for a safetensors header")
    n = int.from_bytes(_read_exactly(fd, 8, path), "little")
    if n > max_header_bytes:
        raise ManifestError(f"{path!r}: header of {n} bytes is over the limit of "
                            f"{max_header_bytes}")
    if 8 + n > size:
        raise ManifestError(f"{path!r}: header length {n} runs past the end of the file")
    raw = _read_exactly(fd, n, path)
    return parse_header(raw, size - 8 - n, repr(path))


def parse_header(raw: bytes, data_bytes: int, what: str = "safetensors file"
                 ) -> dict[str, TensorSpec]:
    """The tensors of a safetensors header ``raw`` whose file holds ``data_bytes`` after it.

    The rules are safetensors' own (``Metadata::validate`` and the serde types of
    ``safetensors/src/tensor.rs``), so what passes here loads there:

    - the header is a JSON object; ``__metadata__``, when present and not null, maps strings to
      strings; every other key is a tensor;
    - a tensor is an object with ``dtype`` (a known name), ``shape`` (an array of integers in
      ``[0, 2**64)``: no strings, fractions, booleans) and ``data_offsets`` (exactly two such
      integers), whose byte count ``end - begin`` is the shape's elements times the dtype's size
      (computed without overflowing 64 bits, as safetensors does);
    - sorted by offsets, the tensors' ranges are contiguous from 0 and cover the data exactly:
      no overlap, no gap, no trailing byte.

    Stricter than safetensors, on purpose: a repeated JSON key (which of two entries is meant
    is ambiguous), a tensor written as an array instead of an object, and what ``TensorSpec``
    bounds (dtypes weightsync moves, names of 1-1024 characters, at most 8 dimensions).
    """
    where = f"{what}: safetensors header"
    header = _json_object(raw, where)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and
                                 all(isinstance(v, str) for v in meta.values())):
        raise ManifestError(f"{where}: '__metadata__' must map strings to strings")
    specs: dict[str, TensorSpec] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        specs[name], begin, end = _tensor_entry(name, entry, f"{where}: bad header entry for "
                                                f"{name[:200]!r}")
        ranges.append((begin, end, name))
    ranges.sort(key=lambda r: (r[0], r[1]))  # safetensors sorts by data_offsets
    at = 0
    for begin, end, name in ranges:
        if begin != at:
            why = ("overlaps the tensor before it" if begin < at else
                   f"leaves {begin - at} unused byte(s) before it")
            raise ManifestError(f"{where}: {name[:200]!r} has data_offsets [{begin}, {end}), "
                                f"which {why}: tensors must cover the data contiguously")
        at = end
    if at != data_bytes:
        raise ManifestError(f"{where}: the tensors' data_offsets end at byte {at} of the data, "
                            f"the file holds {data_bytes} after the header (truncated, or "
                            "trailing bytes)")
    return specs


def _tensor_entry(name: str, entry: object, where: str) -> tuple[TensorSpec, int, int]:
    """One tensor's spec and data offsets, by safetensors' rules (``parse_header``)."""
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected an object with dtype, shape and data_offsets, "
                            f"not {_json_type(entry)}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ManifestError(f"{where}: dtype {str(dtype)[:40]!r} is not one of "
                            f"{sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
        raise ManifestError(f"{where}: shape must be an array of non-negative integers below "
                            f"2**64, not {_described(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_usize, offsets)):
        raise ManifestError(f"{where}: data_offsets must be an array of two non-negative "
                            f"integers below 2**64, not {_described(offsets)}")
    begin, end = offsets
    elements = 1
    for d in shape:  # checked at every step, as safetensors' checked_mul fold
        elements *= d
        if elements >= _USIZE:
            raise ManifestError(f"{where}: shape {shape[:8]} overflows 64 bits")
    nbytes = elements * DTYPE_ITEMSIZE[SAFETENSORS_DTYPES[dtype]]
    if nbytes * 8 >= _USIZE:
        raise ManifestError(f"{where}: shape {shape[:8]} of {dtype} overflows 64 bits")
    if end < begin or end - begin != nbytes:
        raise ManifestError(f"{where}: data_offsets [{begin}, {end}) do not hold the "
                            f"{nbytes} byte(s) of {dtype} {shape[:8]}")
    try:
        spec = TensorSpec(name=name, dtype=SAFETENSORS_DTYPES[dtype], shape=tuple(shape))
    except ValidationError as e:
        err = e.errors()[0]
        raise ManifestError(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return spec, begin, end


def _described(value: object) -> str:
    if isinstance(value, list):
        bad = [v for v in value if not _is_usize(v)]
        if bad:
            return f"an array holding {_json_type(bad[0])} ({str(bad[0])[:40]})"
        return f"an array of {len(value)}"
    return _json_type(value)


def read_checkpoint(path: str, roots: Sequence[str] | None = None, *,
                    max_header_bytes: int = MAX_HEADER_BYTES) -> Checkpoint:
    """Resolve ``path`` and read every file's header (no tensor data). Tensors named in two
    files are a ``ManifestError``."""
    directory = resolve_directory(path, roots)
    files = list_files(directory, roots)
    return Checkpoint(directory=directory, files=files,
                      specs=read_checkpoint_files(files, max_header_bytes))


def read_checkpoint_files(files: Sequence[str], max_header_bytes: int = MAX_HEADER_BYTES
                          ) -> dict[str, TensorSpec]:
    """Every tensor in ``files``' headers; a name in two files is a ``ManifestError``."""
    specs: dict[str, TensorSpec] = {}
    for f in files:
        for name, spec in read_header(f, max_header_bytes).items():
            if name in specs:
                raise ManifestError(f"{name!r} appears in more than one checkpoint file")
            specs[name] = spec
    return specs


def iter_tensors(files: Sequence[str]) -> Iterator[tuple[str, object]]:
    """``(name, tensor)`` for every tensor of ``files``, one file at a time (CPU tensors)."""
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - a safe_open, not a dict
                yield name, st.get_tensor(name)


class PinnedFiles:
    """A checkpoint's files, opened once: what is checked and what is loaded are the same files.

    Resolving paths, checking headers and loading are separate steps, and a file (or a symlink
    in a load root) swapped between them would be loaded unchecked: the loader's own parser
    then refuses it half-way, after the engine paused, and fences it. So an engine opens each
    file once (a regular file; its real path, read from the open file, inside ``roots`` when
    given), checks its header from that open file, and loads through ``/proc/self/fd``, which
    reopens the very file it opened, whatever its path names by then. Linux only (as vLLM).
    """

    def __init__(self, files: Sequence[str], roots: Sequence[str] | None = None) -> None:
        self.files = tuple(files)
        self._fds: list[int] = []
        try:
            for f in self.files:
                fd = _open_regular(f)
                self._fds.append(fd)
                real = os.path.realpath(f"/proc/self/fd/{fd}")
                if roots and not _inside(real, roots):
                    raise ConfigError(f"{f!r} is now {real!r}, outside the allowed load roots "
                                      f"{list(roots)}")
        except BaseException:
            self.close()
            raise

    def specs(self, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorSpec]:
        """Every tensor in the open files' headers (``read_checkpoint_files``' rules)."""
        specs: dict[str, TensorSpec] = {}
        for f, fd in zip(self.files, self._fds, strict=True):
            for name, spec in _header_of(fd, f, max_header_bytes).items():
                if name in specs:
                    raise ManifestError(f"{name!r} appears in more than one checkpoint file")
                specs[name] = spec
        return specs

    def nbytes(self) -> int:
        """Bytes of tensor data the open files hold."""
        return sum(s.nbytes for s in self.specs().values())

    def identity(self) -> str:
        """What was opened: each file's size, modification time and header bytes, hashed.
        Engines that opened the same files agree on it; a file swapped or rewritten between
        two engines' opens makes them differ."""
        h = hashlib.sha256()
        for fd in self._fds:
            st = os.fstat(fd)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
            head = os.pread(fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(os.pread(fd, min(n, MAX_HEADER_BYTES), 8))
        return h.hexdigest()[:32]

    def tensors(self) -> Iterator[tuple[str, object]]:
        """``iter_tensors`` of the open files themselves."""
        return iter_tensors([f"/proc/self/fd/{fd}" for fd in self._fds])

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> PinnedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ADAPTER_CONFIG = "adapter_config.json"  # peft's save_pretrained of a LoRA adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_ADAPTER_BYTES = 4 << 30


def read_adapter(path: str, roots: Sequence[str] | None = None
                 ) -> tuple[dict, dict[str, object]]:
    """A peft adapter directory (``save_pretrained``: ``adapter_config.json`` and
    ``adapter_model.safetensors``) as its config and its tensors (CPU), under this module's
    rules: the directory and both files inside ``roots``, regular files only, the config and
    the header bounded, the header checked as safetensors checks it before any tensor is read,
    and the tensors read from the very file whose header was checked."""
    directory = resolve_directory(path, roots)
    config = _read_json(os.path.join(directory, ADAPTER_CONFIG), 1 << 20, roots)
    weights = os.path.realpath(os.path.join(directory, ADAPTER_WEIGHTS))
    if roots is not None and not _inside(weights, roots):
        raise ConfigError(f"{ADAPTER_WEIGHTS} in {path!r} resolves outside the allowed load "
                          f"roots {list(roots)}")
    with PinnedFiles([weights], roots) as pinned:
        specs = pinned.specs()
        size = sum(s.nbytes for s in specs.values())
        if size > MAX_ADAPTER_BYTES:
            raise ManifestError(f"{ADAPTER_WEIGHTS} holds {size} bytes of tensors (an adapter "
                                f"may hold {MAX_ADAPTER_BYTES})")
        return config, dict(pinned.tensors())
