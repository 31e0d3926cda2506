"""Which checkpoint paths /reload accepts: inside a load root, real directories, real headers."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from weightsync.api.checkpoints import read_specs, resolve_checkpoint
from weightsync.errors import ConfigError, ManifestError


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "root"
    (r / "ckpt").mkdir(parents=True)
    save_file({"a.weight": torch.zeros(2, 3), "b.bias": torch.ones(4, dtype=torch.bfloat16)},
              str(r / "ckpt" / "model.safetensors"))
    return r


def test_accepts_a_checkpoint_inside_a_root_and_returns_its_real_path(root):
    assert resolve_checkpoint(str(root / "ckpt"), [str(root)]) == os.path.realpath(root / "ckpt")
    assert resolve_checkpoint(str(root / "ckpt") + "/", ["/elsewhere", str(root)]) \
        == os.path.realpath(root / "ckpt")


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
        resolve_checkpoint(make_path(root, tmp_path), [str(root)])


def test_symlink_escaping_the_root_is_rejected(root, tmp_path):
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link")
    with pytest.raises(ConfigError, match="outside"):
        resolve_checkpoint(str(root / "link"), [str(root)])


def test_no_roots_means_no_paths(root):
    with pytest.raises(ConfigError, match="no load roots"):
        resolve_checkpoint(str(root / "ckpt"), [])


def test_directory_without_safetensors_is_a_manifest_error(root):
    (root / "empty").mkdir()
    with pytest.raises(ManifestError, match="no \\*.safetensors"):
        resolve_checkpoint(str(root / "empty"), [str(root)])


def test_read_specs_from_headers_and_corrupt_headers(root):
    specs = {s.name: s for s in read_specs(str(root / "ckpt"))}
    assert specs["a.weight"].shape == (2, 3) and specs["a.weight"].dtype == "float32"
    assert specs["b.bias"].dtype == "bfloat16"
    (root / "bad").mkdir()
    (root / "bad" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    with pytest.raises(ManifestError, match="unreadable safetensors header"):
        read_specs(str(root / "bad"))
