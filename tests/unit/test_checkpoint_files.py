"""Which checkpoint directories and files are read, and how (``weightsync.checkpoint``): inside
a load root file by file, regular files only, bounded headers, no glob, no blocking open."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from weightsync.checkpoint import list_files, read_checkpoint, read_header, resolve_directory
from weightsync.errors import ConfigError, ManifestError


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "root"
    (r / "ckpt").mkdir(parents=True)
    save_file({"a.weight": torch.zeros(2, 3), "b.bias": torch.ones(4, dtype=torch.bfloat16)},
              str(r / "ckpt" / "model.safetensors"))
    return r


def test_accepts_a_checkpoint_inside_a_root_and_returns_real_paths(root):
    real = os.path.realpath(root / "ckpt")
    assert resolve_directory(str(root / "ckpt"), [str(root)]) == real
    assert resolve_directory(str(root / "ckpt") + "/", ["/elsewhere", str(root)]) == real
    ckpt = read_checkpoint(str(root / "ckpt"), [str(root)])
    assert ckpt.files == (os.path.join(real, "model.safetensors"),)
    assert ckpt.specs["a.weight"].shape == (2, 3) and ckpt.specs["a.weight"].dtype == "float32"
    assert ckpt.specs["b.bias"].dtype == "bfloat16"


@pytest.mark.parametrize("make_path, match", [
    (lambda r, t: str(t / "outside"), "outside the allowed load roots"),
    (lambda r, t: str(r / ".." / "root-sibling"), "outside the allowed load roots"),
    (lambda r, t: str(r) + "-suffix", "outside the allowed load roots"),  # prefix is not inside
    (lambda r, t: "ckpt", "must be absolute"),
    (lambda r, t: str(r / "missing"), "not a directory"),
    (lambda r, t: str(r / "ckpt" / "model.safetensors"), "not a directory"),
    (lambda r, t: str(r) + "/\x00", "unusable checkpoint path"),
    (lambda r, t: str(r) + "/\ud800", "unusable checkpoint path"),  # lone surrogate
    (lambda r, t: str(r) + "/" + "x" * 5000, "not a directory"),
])
def test_rejects_paths_outside_roots_or_unusable(root, tmp_path, make_path, match):
    (tmp_path / "outside").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=match):
        read_checkpoint(make_path(root, tmp_path), [str(root)])


def test_directory_symlink_escaping_the_root_is_rejected(root, tmp_path):
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link")
    with pytest.raises(ConfigError, match="outside"):
        read_checkpoint(str(root / "link"), [str(root)])


def test_file_symlink_escaping_the_root_is_rejected(root, tmp_path):
    save_file({"a.weight": torch.zeros(2, 3)}, str(tmp_path / "secret.safetensors"))
    (root / "sneaky").mkdir()
    os.symlink(tmp_path / "secret.safetensors", root / "sneaky" / "model.safetensors")
    with pytest.raises(ConfigError, match="resolves to .* outside the allowed load roots"):
        read_checkpoint(str(root / "sneaky"), [str(root)])
    # the same link is fine for a trusted caller (no roots), and inside a root it is fine too
    assert read_checkpoint(str(root / "sneaky")).specs["a.weight"].shape == (2, 3)
    (root / "inner").mkdir()
    os.symlink(root / "ckpt" / "model.safetensors", root / "inner" / "model.safetensors")
    assert "b.bias" in read_checkpoint(str(root / "inner"), [str(root)]).specs


def test_no_roots_means_no_paths(root):
    with pytest.raises(ConfigError, match="no load roots"):
        read_checkpoint(str(root / "ckpt"), [])


def test_directory_without_safetensors_is_a_manifest_error(root):
    (root / "empty").mkdir()
    with pytest.raises(ManifestError, match="no \\*.safetensors"):
        read_checkpoint(str(root / "empty"), [str(root)])


def test_glob_characters_in_a_directory_name_are_just_characters(root):
    odd = root / "gl[ob]*?"
    odd.mkdir()
    save_file({"a.weight": torch.zeros(2, 3)}, str(odd / "model.safetensors"))
    assert list(read_checkpoint(str(odd), [str(root)]).specs) == ["a.weight"]


def test_a_fifo_is_refused_at_once_instead_of_blocking(root):
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "model.safetensors")
    out: dict = {}

    def read() -> None:
        try:
            read_checkpoint(str(root / "fifo"), [str(root)])
        except ManifestError as e:
            out["error"] = e

    t = threading.Thread(target=read, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(5)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert "not a regular file" in str(out["error"]) and time.monotonic() - t0 < 5


def test_headers_are_bounded_checked_and_never_trusted(root):
    bad = root / "bad"
    bad.mkdir()
    f = bad / "model.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(ManifestError, match="safetensors header: unreadable JSON"):
        read_checkpoint(str(bad), [str(root)])
    f.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ManifestError, match="over the limit"):
        read_header(str(f))
    f.write_bytes((100).to_bytes(8, "little") + b"{}")
    with pytest.raises(ManifestError, match="runs past the end"):
        read_header(str(f))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # 8 of 16 bytes
    with pytest.raises(ManifestError, match="offsets"):
        read_header(str(f))
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ManifestError, match="bad header entry"):
        read_header(str(f))
    big = json.dumps({"__metadata__": {"x": "y" * 4096}}).encode()
    f.write_bytes(len(big).to_bytes(8, "little") + big)
    with pytest.raises(ManifestError, match="over the limit"):
        read_header(str(f), max_header_bytes=1024)


def test_index_file_decides_which_shards_count(root):
    d = root / "sharded"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "model-00002-of-00002.safetensors"))
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, str(d / "consolidated.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    ckpt = read_checkpoint(str(d), [str(root)])
    assert [os.path.basename(f) for f in ckpt.files] == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert sorted(ckpt.specs) == ["a", "b"]
    os.remove(d / "model.safetensors.index.json")  # now consolidated's copies are duplicates
    with pytest.raises(ManifestError, match="more than one checkpoint file"):
        read_checkpoint(str(d), [str(root)])
    assert len(list_files(str(d))) == 3


def test_a_trusted_relative_path_is_read_from_the_working_directory(root, monkeypatch):
    monkeypatch.chdir(root)
    assert "a.weight" in read_checkpoint("ckpt").specs
    with pytest.raises(ConfigError, match="must be absolute"):
        read_checkpoint("ckpt", [str(root)])
