"""An engine reads checkpoints only inside its own spec's load roots, whoever asks and whatever
roots they pass; and it loads exactly the files it checked (``checkpoint.PinnedFiles``).

Run on the in-process fleet (a real ``EngineHost`` and worker extension over a stand-in vLLM):
the engine's own checks, with no HTTP layer in front to catch anything first.
"""

from __future__ import annotations

import os

import pytest
import torch

from weightsync.checkpoint import PinnedFiles, read_checkpoint
from weightsync.config import TransferConfig
from weightsync.coordinator import SyncCoordinator
from weightsync.errors import ConfigError
from weightsync.testing.fleet import Faults, LocalEngines, TinyModel, save_tiny_model
from weightsync.types import EngineState


@pytest.fixture()
def rooted(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    engines = LocalEngines(save_tiny_model(tmp_path / "model"), {"a": Faults()},
                           load_roots=(str(root),))
    coord = SyncCoordinator(engines, TransferConfig(bucket_bytes=1 << 16))
    yield engines, coord, root
    coord.close()
    engines.close()


@pytest.mark.parametrize("roots", [None, "wider", "outside"])
def test_a_path_outside_the_engines_own_roots_is_refused_whatever_roots_the_caller_passes(
        rooted, tmp_path, roots):
    engines, coord, root = rooted
    outside = save_tiny_model(tmp_path / "elsewhere", seed=5)
    caller = {None: None, "wider": [str(tmp_path)], "outside": [str(outside)]}[roots]
    v0 = coord.version
    with pytest.raises(ConfigError, match="outside the allowed load roots"):
        coord.reload_checkpoint(str(outside), roots=caller)
    host = engines.handles["a"]
    assert host.state == EngineState.SERVING and host.version == v0


def test_caller_roots_narrow_the_engines_roots(rooted):
    engines, coord, root = rooted
    inside = save_tiny_model(root / "ckpt", seed=6)
    with pytest.raises(ConfigError):  # inside the engine's roots, not the caller's
        coord.reload_checkpoint(str(inside), roots=[str(root / "other")])
    res = coord.reload_checkpoint(str(inside), roots=[str(root)])
    assert res.ok and res.engines[0].nbytes == read_checkpoint(str(inside)).nbytes
    want = TinyModel.seeded(6).state_dict()
    got = engines.weights("a")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_pinned_files_load_what_was_opened_even_if_the_path_is_swapped(tmp_path):
    good = save_tiny_model(tmp_path / "good", seed=1) / "model.safetensors"
    other = save_tiny_model(tmp_path / "other", seed=2) / "model.safetensors"
    link = tmp_path / "ckpt" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(good)
    files = read_checkpoint(str(link.parent)).files
    with PinnedFiles(files) as pinned:
        specs = pinned.specs()
        os.replace(other, good)  # the file the header was read from is replaced on disk
        loaded = dict(pinned.tensors())
    assert set(loaded) == set(specs)
    want = TinyModel.seeded(1).state_dict()
    assert all(torch.equal(loaded[n], want[n]) for n in want)  # the opened file, not the new one


def test_pinned_files_refuse_a_file_that_now_resolves_outside_the_roots(tmp_path):
    """The host resolved real paths inside the roots; by the time the worker opens them, a
    file became a symlink (refused: never followed) or a directory on the way became one that
    leads outside (refused: the open file's real path is outside)."""
    from weightsync.errors import ManifestError

    root = tmp_path / "root"
    inside = save_tiny_model(root / "ckpt", seed=1) / "model.safetensors"
    outside = save_tiny_model(tmp_path / "outside", seed=2)
    link = root / "flip.safetensors"
    link.symlink_to(outside / "model.safetensors")
    with pytest.raises(ManifestError, match="symbolic link"):
        PinnedFiles([str(inside), str(link)], [str(root)])
    (root / "dir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="outside the allowed load roots"):
        PinnedFiles([str(inside), str(root / "dir" / "model.safetensors")], [str(root)])
