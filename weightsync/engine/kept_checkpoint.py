"""The checkpoint files a worker checked, kept open until it loads them.

Validation and the load are two calls (``ws_check_files`` before the engines pause,
``ws_reload_files`` after): a file swapped in between, or between two engines' reads, would be
loaded unchecked or differ across the fleet. So a worker keeps the files it checked open
(``checkpoint.PinnedFiles``) under their identity, and loads only the files of the identity it
is asked for — every engine the same, as the coordinator made sure.
"""

from __future__ import annotations

from collections.abc import Callable

from weightsync.checkpoint import PinnedFiles
from weightsync.errors import ManifestError
from weightsync.types import CheckpointFiles


class KeptCheckpoint:
    """At most one checked checkpoint, open, by identity. One per worker."""

    def __init__(self) -> None:
        self._kept: tuple[str, PinnedFiles] | None = None

    def check(self, ckpt: CheckpointFiles, check: Callable[[PinnedFiles], object]) -> str:
        """Open ``ckpt``'s files, ``check`` them, and keep them open; returns their identity.
        Whatever was kept before is closed."""
        self.drop()
        files = PinnedFiles(ckpt.files, ckpt.roots or None)
        try:
            check(files)
            identity = files.identity()
        except BaseException:
            files.close()
            raise
        self._kept = (identity, files)
        return identity

    def take(self, ckpt: CheckpointFiles) -> PinnedFiles:
        """The files to load for ``ckpt`` (the caller closes them): the kept ones of its
        identity, or, for a request without one, the files opened now. A kept checkpoint of
        another identity is a ``ManifestError`` (nothing loaded)."""
        kept, self._kept = self._kept, None
        if ckpt.identity is None:
            if kept is not None:
                kept[1].close()
            return PinnedFiles(ckpt.files, ckpt.roots or None)
        if kept is None or kept[0] != ckpt.identity:
            if kept is not None:
                kept[1].close()
            raise ManifestError("this engine no longer holds the checkpoint files it checked "
                                "(checked again since?); nothing was loaded")
        return kept[1]

    def drop(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[1].close()
