"""Which checkpoint directories ``/reload`` may read, and what they contain (headers only).

A path is accepted only if, after resolving ``..`` and symlinks, it lies inside one of the
configured load roots, is a directory, and holds ``*.safetensors`` files whose headers parse.
The service reads the same filesystem as the engines (one host, or roots on shared storage).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from weightsync.errors import ConfigError, ManifestError
from weightsync.types import TensorSpec


def resolve_checkpoint(path: str, roots: Sequence[str]) -> str:
    """The real path of checkpoint directory ``path`` if it lies inside one of ``roots``."""
    if not roots:
        raise ConfigError("no load roots are configured (WEIGHTSYNC_LOAD_ROOTS): "
                          "only a reload of the original model is allowed")
    if not os.path.isabs(path):
        raise ConfigError(f"checkpoint path must be absolute, not {path!r}")
    try:
        real = os.path.realpath(path)
        inside = any(os.path.commonpath([real, r]) == r
                     for r in (os.path.realpath(root) for root in roots))
        is_dir = os.path.isdir(real)
    except (ValueError, OSError) as e:  # NUL bytes, unencodable text, over-long names
        raise ConfigError(f"unusable checkpoint path: {e}") from None
    if not inside:
        raise ConfigError(f"{path!r} is outside the allowed load roots {list(roots)}")
    if not is_dir:
        raise ConfigError(f"{path!r} is not a directory")
    if not glob.glob(os.path.join(glob.escape(real), "*.safetensors")):
        raise ManifestError(f"no *.safetensors files in {path!r}")
    return real


def read_specs(checkpoint_dir: str) -> list[TensorSpec]:
    """Tensor names, dtypes and shapes from the safetensors headers (no tensor is loaded)."""
    from weightsync.engine.worker_ext import checkpoint_specs

    try:
        return list(checkpoint_specs(checkpoint_dir).values())
    except ManifestError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt header is bad input, not a server fault
        raise ManifestError(f"unreadable safetensors header in {checkpoint_dir!r}: "
                            f"{type(e).__name__}: {e}") from None
