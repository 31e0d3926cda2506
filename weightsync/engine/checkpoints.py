"""Which checkpoint files an engine reads, and the ones its workers checked and keep open.

A directory (``None``: the engine's own model) resolves into its files in a thread and under a
deadline (``weightsync.checkpoint``: files one by one, inside the load roots, regular files
only, bounded headers). The workers open them, check their headers against the model and keep
those same open files for the load (``ws_check_files``, ``ws_reload_files``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from weightsync.checkpoint import read_checkpoint
from weightsync.config import EngineSpec
from weightsync.engine.worker_calls import WorkerCalls
from weightsync.errors import DeadlineExceeded, ManifestError
from weightsync.messages import CheckedFiles
from weightsync.types import CheckpointFiles


class CheckpointReader:
    """Invariants: the engine's own ``EngineSpec.load_roots`` bind every path it reads,
    whoever asks (``roots`` from a caller may only narrow them: a path must be inside both);
    and a reload by identity loads exactly the files the last check kept, or nothing."""

    def __init__(self, spec: EngineSpec, calls: WorkerCalls) -> None:
        self._spec, self._calls = spec, calls
        self._checked: CheckpointFiles | None = None  # what the last check's workers hold

    async def resolve(self, path: str | None, partial: bool, roots: Sequence[str] | None,
                      deadline_s: float, check_finite: bool = True) -> CheckpointFiles:
        """``path``'s files (an engine started without load roots reads where its trusted
        caller says)."""
        own = self._spec.load_roots if path is not None else ()

        def resolve() -> tuple[str, ...]:
            if path is None:
                return read_checkpoint(self._spec.model).files
            if own and roots is not None:
                read_checkpoint(path, roots)  # (inside the caller's roots too)
            return read_checkpoint(path, own or roots).files

        try:
            files = await asyncio.wait_for(asyncio.to_thread(resolve), deadline_s)
        except TimeoutError as e:
            raise DeadlineExceeded(f"reading checkpoint headers took over {deadline_s:.0f}s",
                                   engine=self._spec.name) from e
        return CheckpointFiles(files=files, partial=partial and path is not None,
                               check_finite=check_finite,
                               roots=tuple(own or roots or ()) if path is not None else ())

    async def check(self, path: str | None, partial: bool, roots: Sequence[str] | None,
                    deadline_s: float) -> str:
        """Resolve and have the workers check and keep the files; their identity."""
        ckpt = await self.resolve(path, partial, roots, deadline_s)
        checked = await self._calls.rpc("ws_check_files", ckpt.model_dump_json(),
                                        reply=CheckedFiles, timeout=deadline_s)
        if len({c.identity for c in checked}) != 1:
            raise ManifestError("the checkpoint changed while this engine's workers read it; "
                                "nothing was loaded", engine=self._spec.name)
        self._checked = ckpt.model_copy(update={"identity": checked[0].identity})
        return checked[0].identity

    async def for_load(self, path: str | None, partial: bool, roots: Sequence[str] | None,
                       deadline_s: float, check_finite: bool,
                       identity: str | None) -> CheckpointFiles:
        """What a reload loads: the files checked as ``identity`` (kept open by the workers:
        no new read), or ``path`` resolved now. Either way the kept files are spent."""
        kept, self._checked = self._checked, None
        if identity is None:
            return await self.resolve(path, partial, roots, deadline_s, check_finite)
        if kept is None or kept.identity != identity:
            raise ManifestError("this engine no longer holds the checkpoint it checked; "
                                "nothing was loaded", engine=self._spec.name)
        return kept.model_copy(update={"check_finite": check_finite})
