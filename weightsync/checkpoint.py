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
  data is touched and nothing is memory-mapped. Offsets must lie inside the file.

With a ``model.safetensors.index.json`` only the files its ``weight_map`` names are used, as
vLLM's loader does (a stray ``consolidated.safetensors`` beside shards is not a second copy).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from weightsync.errors import ConfigError, ManifestError
from weightsync.types import TensorSpec

MAX_HEADER_BYTES = 16 << 20  # safetensors' own limit is 100 MB; real headers are < 5 MB
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory as resolved: its real path, files (real paths) and tensors."""

    directory: str
    files: tuple[str, ...]
    specs: dict[str, TensorSpec]


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
        wanted = set(_read_json(index, MAX_HEADER_BYTES, roots).get("weight_map", {}).values())
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
        chunk = os.read(fd, min(left, 1 << 20))
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
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{what}: unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{what}: not a JSON object")
    return data


def read_header(path: str, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorSpec]:
    """Tensor names, dtypes and shapes from one safetensors file's header (``ManifestError`` if
    it is not a regular file, its header is over the bound, malformed, or points past the end)."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise ManifestError(f"{path!r} is too short for a safetensors header")
        n = int.from_bytes(_read_exactly(fd, 8, path), "little")
        if n > max_header_bytes:
            raise ManifestError(f"{path!r}: header of {n} bytes is over the limit of "
                                f"{max_header_bytes}")
        if 8 + n > size:
            raise ManifestError(f"{path!r}: header length {n} runs past the end of the file")
        header = _json_object(_read_exactly(fd, n, path), f"{path!r}: safetensors header")
    finally:
        os.close(fd)
    data_bytes = size - 8 - n
    specs: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            spec = TensorSpec(name=name, dtype=dtype, shape=shape)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path!r}: bad header entry for {name!r}: "
                                f"{type(e).__name__}: {e}") from None
        if not 0 <= begin <= end <= data_bytes or end - begin != spec.nbytes:
            raise ManifestError(f"{path!r}: {name!r} has offsets [{begin}, {end}) that do not "
                                f"fit its {math.prod(shape)} elements or the file")
        specs[name] = spec
    return specs


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
            for name in st.keys():
                yield name, st.get_tensor(name)
