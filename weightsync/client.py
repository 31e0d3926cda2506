"""Typed HTTP client for the control plane, used by the CLI and by trainers.

Every call returns the service's own response models and raises the library's typed errors
(the JSON ``{code, message, engine}`` body is turned back into a ``WeightSyncError``
subclass, with ``status_code`` set). ``push_weights`` is the whole trainer side of a sync
session in one call, for trainers outside the Ray cluster.

Retries: GET requests are retried on 5xx and on transport errors, with backoff. A POST is
retried only when the connection could not be made (it never reached the service): a POST
that got a 5xx may already have changed engines, and repeating ``/reload`` would publish a
second version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel

from weightsync.api.http_errors import API_ERRORS, FALLBACK_BY_STATUS
from weightsync.api.schemas import (
    AbortRequest,
    AdapterReloadRequest,
    CommitRequest,
    EngineList,
    EngineStates,
    FleetStatus,
    Health,
    PauseRequest,
    ReloadRequest,
    ResumeRequest,
    SessionClosed,
    SessionInfo,
    SessionRequest,
    SleepRequest,
    WakeRequest,
)
from weightsync.errors import WeightSyncError
from weightsync.types import PauseMode, SleepResult, SyncResult

if TYPE_CHECKING:  # (weightsync.adapters brings torch: imported where used)
    from weightsync.adapters import AdapterFleetResult, AdapterState

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
LONG_TIMEOUT_S = 1800.0  # reload and commit wait for the fleet's own (bounded) deadlines


def _error_from(response: httpx.Response) -> WeightSyncError:
    """The typed error a non-2xx response stands for."""
    body: Any = None
    try:
        body = response.json()
        code, message, engine = body["code"], body["message"], body.get("engine")
    except (ValueError, KeyError, TypeError):
        code, message, engine = "http_error", response.text[:500] or response.reason_phrase, None
    cls = _error_classes().get(code) or FALLBACK_BY_STATUS.get(response.status_code,
                                                                WeightSyncError)
    err = cls(f"HTTP {response.status_code} {code}: {message}", engine=engine)
    err.status_code = response.status_code  # type: ignore[attr-defined]
    if code == "sync_failed" and isinstance(body.get("result"), dict):
        err.result = SyncResult.model_validate(body["result"])  # type: ignore[attr-defined]
    return err


def _error_classes() -> dict[str, type[WeightSyncError]]:
    """Error classes by code. Only weightsync's own: Ray derives a ``RayTaskError(X)`` subclass
    of every error that crossed an actor boundary, with the same ``code`` and an incompatible
    constructor, so ``weightsync.errors.error_class`` can return one of those in a driver."""
    out: dict[str, type[WeightSyncError]] = {}
    todo: list[type[WeightSyncError]] = [WeightSyncError, *API_ERRORS]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("weightsync."):
            if "code" in vars(cls):
                out[cls.code] = cls
            todo.extend(cls.__subclasses__())
    return out


class WeightSyncClient:
    """``with WeightSyncClient("http://127.0.0.1:8765", token=...) as c: c.status()``"""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout,
                                  transport=transport)
        self.retries = retries
        self.backoff_s = backoff_s

    def __enter__(self) -> WeightSyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, body: BaseModel | None = None,
                 timeout: float | None = None) -> httpx.Response:
        kw: dict[str, Any] = {}
        if body is not None:
            kw["content"] = body.model_dump_json(exclude_none=True)
            kw["headers"] = {"Content-Type": "application/json"}
        if timeout is not None:
            kw["timeout"] = timeout
        idempotent = method == "GET"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kw)
            except httpx.ConnectError:
                if last:
                    raise
            except httpx.TransportError:
                if last or not idempotent:
                    raise
            else:
                if response.status_code < 500 or not idempotent or last:
                    break
                logger.warning("%s %s -> %d; retrying", method, path, response.status_code)
            time.sleep(self.backoff_s * 2 ** attempt)
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as e:
            raise _error_from(response) from e
        return response

    def _get(self, path: str, model: type[M]) -> M:
        return model.model_validate_json(self._request("GET", path).content)

    def _post(self, path: str, body: BaseModel | None, model: type[M],
              timeout: float | None = None) -> M:
        return model.model_validate_json(self._request("POST", path, body=body,
                                                       timeout=timeout).content)

    # ---- reads -------------------------------------------------------------------------------
    def health(self) -> Health:
        return self._get("/healthz", Health)

    def status(self) -> FleetStatus:
        return self._get("/status", FleetStatus)

    def engines(self) -> EngineList:
        return self._get("/engines", EngineList)

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    # ---- engine actions ----------------------------------------------------------------------
    def sleep(self, level: int = 1, engines: Sequence[str] | None = None,
              mode: str = "abort") -> SleepResult:
        """Release the engines' device memory for a colocated trainer; the next reload or sync
        session wakes them (``SleepResult``: per engine, what it freed or why nothing)."""
        return self._post("/sleep", SleepRequest(level=level, engines=_names(engines),
                                                 mode=mode), SleepResult)

    def wake(self, tags: Sequence[str] | None = None,
             engines: Sequence[str] | None = None) -> EngineStates:
        return self._post("/wake", WakeRequest(tags=list(tags) if tags else None,
                                               engines=_names(engines)), EngineStates)

    def pause(self, mode: PauseMode = "abort",
              engines: Sequence[str] | None = None) -> EngineStates:
        return self._post("/pause", PauseRequest(mode=mode, engines=_names(engines)),
                          EngineStates)

    def resume(self, engines: Sequence[str] | None = None) -> EngineStates:
        return self._post("/resume", ResumeRequest(engines=_names(engines)), EngineStates)

    def reload(self, path: str | None = None, *, engines: Sequence[str] | None = None,
               pause_mode: PauseMode = "abort", partial: bool = False) -> SyncResult:
        """Reload from a checkpoint directory under a load root (None: the original model).
        ``partial``: the checkpoint may hold only some of the model's tensors."""
        return self._post("/reload", ReloadRequest(path=path, engines=_names(engines),
                                                   pause_mode=pause_mode, partial=partial),
                          SyncResult, timeout=LONG_TIMEOUT_S)

    # ---- LoRA adapters -----------------------------------------------------------------------
    def adapters(self) -> dict[str, AdapterState]:
        """Each engine's LoRA adapters (``GET /adapters``)."""
        from weightsync.adapters import AdapterState

        raw = self._request("GET", "/adapters").json()
        return {name: AdapterState.model_validate(s) for name, s in raw.items()}

    def reload_adapter(self, name: str, path: str, *,
                       engines: Sequence[str] | None = None) -> AdapterFleetResult:
        """Load a peft adapter directory under a load root as ``name``'s next version on every
        engine, all or nothing (``POST /adapters/{name}/reload``)."""
        from weightsync.adapters import AdapterFleetResult

        return self._post(f"/adapters/{name}/reload",
                          AdapterReloadRequest(path=path, engines=_names(engines)),
                          AdapterFleetResult, timeout=LONG_TIMEOUT_S)

    # ---- sync sessions -----------------------------------------------------------------------
    def open_session(self, request: SessionRequest) -> SessionInfo:
        return self._post("/sessions", request, SessionInfo, timeout=LONG_TIMEOUT_S)

    def commit_session(self, session: str, checksums: Sequence[int]) -> SyncResult:
        return self._post(f"/sessions/{session}/commit",
                          CommitRequest(checksums=list(checksums)), SyncResult,
                          timeout=LONG_TIMEOUT_S)

    def abort_session(self, session: str, reason: str) -> SessionClosed:
        return self._post(f"/sessions/{session}/abort", AbortRequest(reason=reason[:2000]),
                          SessionClosed, timeout=LONG_TIMEOUT_S)

    def push_weights(self, weights: Any, *, host: str = "127.0.0.1", port: int = 0,
                     pause_mode: PauseMode = "abort", sleep_level: int = 0,
                     engines: Sequence[str] | None = None, partial: bool = False) -> SyncResult:
        """Sync ``weights`` (module, state dict, or ``(name, tensor)`` pairs) into the fleet.

        This process hosts the transfer group as rank 0 on ``host:port`` (``host`` must be
        reachable from the engines; port 0 picks a free one here), broadcasts the bucket plan
        the service hands out, and commits its checksums. On any failure the group is torn
        down at once (engines fail fast instead of waiting out a deadline), the session is
        aborted so the fleet rolls back, and the error is re-raised.
        """
        from weightsync.transport.broadcast import BroadcastSender, free_port, open_group
        from weightsync.transport.packing import named_tensors, spec_of

        tensors = dict(named_tensors(weights))
        port = port or free_port(host)
        info = self.open_session(SessionRequest(
            tensors=[spec_of(n, t) for n, t in tensors.items()], host=host, port=port,
            pause_mode=pause_mode, sleep_level=sleep_level, engines=_names(engines),
            partial=partial))
        dl = info.transfer.deadlines
        group = None
        committing = False
        try:
            group = open_group(info.backend, info.host, info.port, info.rank, info.world_size,
                               dl.rendezvous)
            sums = BroadcastSender(group).send(info.plan, tensors, dl.transfer)
            committing = True  # from here on the service decides the outcome
            result = self.commit_session(info.session, sums)
        except BaseException as e:
            if group is not None:
                group.close()
                group = None
            if committing:
                raise
            try:
                closed = self.abort_session(info.session, f"{type(e).__name__}: {e}")
                logger.error("session %s aborted: %s", info.session, closed.message)
            except (WeightSyncError, httpx.HTTPError):
                logger.warning("session %s: abort failed", info.session, exc_info=True)
            raise
        finally:
            if group is not None:
                group.close()
        return result


def _names(engines: Sequence[str] | None) -> list[str] | None:
    return list(engines) if engines else None
