"""Schemathesis against the running control plane (real uvicorn, real Ray, real vLLM CPU
engines): every phase — examples, coverage, fuzzing, and the stateful phase that follows the
OpenAPI links from ``POST /sessions`` to its commit and abort — with every check that applies,
and zero 5xx.

A session only works if a trainer sends. ``Trainers`` plays that part for real: when a session
opens (201), a thread hosts the group as rank 0 and broadcasts the model's tensors, and a commit
that schemathesis sends for that session carries that trainer's checksums (it could not guess
them). To make sessions open at all, some generated ``POST /sessions`` bodies get the model's
own tensor list and this machine's address (the rest stay as generated: refused with 4xx). A
trainer whose session is neither committed nor aborted within ``GIVE_UP_S`` aborts it itself,
as a real trainer would, so the fleet is never held until a deadline.
"""

from __future__ import annotations

import threading
import time

import httpx
import hypothesis.strategies as st
import pytest

from tests.integration.api_server import AUTH, TOKEN, restore
from weightsync.testing.reference import load_trainer_model

pytestmark = pytest.mark.integration
# How long a trainer waits for its commit before it aborts the session itself. Only the
# stateful phase follows the links to commit/abort; elsewhere nobody will, so it gives up at once.
GIVE_UP_S = {"stateful": 60.0}
MAX_EXAMPLES = 25

# Checks that do not apply here, and why (every other check schemathesis ships runs):
NOT_APPLICABLE = {
    "use_after_free": "needs a DELETE route; the API deletes nothing",
    "object_level_authorization": "needs several identities; the API has one token",
    "max_response_time": "timing is for benchmarks, never for tests",
}
# Schema-valid input that the server refuses by design, for reasons a schema cannot state: a
# path outside the load roots, tensors the model does not have, sleep on a CPU engine. 422
# says so; everything else positive_data_acceptance demands still holds.
POSITIVE_ALSO = ["422"]


class Trainers:
    """One real trainer per opened session (see the module docstring)."""

    def __init__(self, url: str, tensors: dict) -> None:
        self.url, self.tensors = url, tensors
        self.sums: dict[str, list[int]] = {}
        self.closed: dict[str, threading.Event] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.errors: list[str] = []
        self.opened: dict[str, int] = {}  # phase -> sessions opened
        self.committed = 0

    def start(self, info: dict, phase: str) -> None:
        sid = info["session"]
        self.opened[phase] = self.opened.get(phase, 0) + 1
        self.closed[sid] = threading.Event()
        self.threads[sid] = threading.Thread(target=self._send,
                                             args=(info, GIVE_UP_S.get(phase, 0.0)), daemon=True)
        self.threads[sid].start()

    def _send(self, info: dict, give_up_s: float) -> None:
        from weightsync.transport.broadcast import BroadcastSender, open_group
        from weightsync.types import TransferPlan

        sid, group = info["session"], None
        try:
            dl = info["transfer"]["deadlines"]
            group = open_group(info["backend"], info["host"], info["port"], info["rank"],
                               info["world_size"], dl["rendezvous"])
            plan = TransferPlan.model_validate(info["plan"])
            self.sums[sid] = BroadcastSender(group).send(plan, self.tensors, dl["transfer"])
            if not self.closed[sid].wait(give_up_s):  # nobody committed: give up like a trainer
                httpx.post(f"{self.url}/sessions/{sid}/abort", headers=AUTH, timeout=300,
                           json={"reason": "the fuzzing trainer gave up"})
                self.closed[sid].set()
        except Exception as e:  # noqa: BLE001 - reported by the test
            # a session aborted under its trainer (schemathesis follows the abort link; an
            # abort before the engines joined ends the session at once) leaves the trainer's
            # group half open: its broadcast failing then is the abort working, not an error
            if not self.closed[sid].wait(30):
                self.errors.append(f"{sid}: {type(e).__name__}: {e}")
        finally:
            if group is not None:
                self.closed[sid].wait(300)
                group.close()

    def checksums_for(self, sid: str) -> list[int] | None:
        thread = self.threads.get(sid)
        if thread is None:
            return None
        end = time.monotonic() + 120
        while sid not in self.sums and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.05)
        return self.sums.get(sid)

    def finish(self) -> None:
        for sid, ev in self.closed.items():
            if not ev.is_set():
                httpx.post(f"{self.url}/sessions/{sid}/abort", headers=AUTH, timeout=300,
                           json={"reason": "fuzzing finished"})
                ev.set()
        for t in self.threads.values():
            t.join(60)


def _phase(case) -> str:
    meta = getattr(case, "_meta", None)
    return meta.phase.name.value if meta is not None else ""


ROLLOUT_PATHS = r"^/(v1/|tokenize$|detokenize$|inference/)"

def _config(phases: list[str]):
    import schemathesis

    return schemathesis.Config.from_dict({
        "seed": 20261201,
        "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        "request-timeout": 600,
        "checks": {
            **{name: {"enabled": False} for name in NOT_APPLICABLE
               if name != "max_response_time"},  # opt-in: off unless given a bound
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx"]},
            # 413 (body over the limit) is a rejection too; the check's default list omits it
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413",
                                      "415", "422", "428", "429"]},
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "429",
                                      *POSITIVE_ALSO]},
        },
        "phases": {
            **{p: {"enabled": p in phases} for p in ("examples", "coverage", "fuzzing")},
            "stateful": {"enabled": "stateful" in phases, "max-steps": 6,
                         "generation": {"max-examples": 40}},
        },
    })


def malformed_checkpoints(root) -> list[str]:
    """One checkpoint directory in the load root per malformed safetensors file of the outside
    test (``tests/unit/test_checkpoint_rules.MALFORMED``: files safetensors itself refuses),
    so generated ``/reload`` bodies reach them."""
    from tests.unit.test_checkpoint_rules import MALFORMED, _write

    dirs = []
    for i, (_, header, data, raw, _) in enumerate(MALFORMED):
        d = root / f"malformed-{i}"
        d.mkdir(exist_ok=True)
        _write(d / "model.safetensors", header, data, raw)
        dirs.append(str(d))
    return dirs


class Run:
    """One schemathesis engine run, with the trainer hooks installed on its schema."""

    def __init__(self, url: str, trainers: Trainers, specs: list[dict],
                 malformed: list[str] = ()) -> None:
        self.url, self.trainers, self.specs = url, trainers, specs
        self.malformed = list(malformed)
        self.reached: dict[str, list[int]] = {"malformed file": [], "duplicate names": []}
        self.statuses: dict[str, list[int]] = {}
        self.failures: list[str] = []
        self.phases: dict[str, str] = {}

    def __call__(self, phases: list[str], path_regex: str | None = None) -> None:
        import schemathesis
        from schemathesis.engine import Status, events

        schema = schemathesis.openapi.from_url(self.url + "/openapi.json",
                                               config=_config(phases))
        if path_regex is not None:
            schema = schema.include(path_regex=path_regex)
        # not the rollout routes: their bodies are vLLM's (an open object in this schema), and
        # whether an engine can take one follows the fleet state the fuzzer itself changes
        # (/pause, /sleep: then 503 is the right answer); tests/integration/
        # test_openai_router_cpu.py covers them
        schema = schema.exclude(path_regex=ROLLOUT_PATHS)
        self._install(schema)
        for event in schemathesis.engine.from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                for checks in event.recorder.checks.values():
                    for check in checks:
                        if check.status == Status.FAILURE:
                            info = check.failure_info
                            self.failures.append(f"{event.recorder.label}: {check.name}: "
                                                 f"{info.failure.title if info else ''}")
            elif isinstance(event, events.PhaseFinished) and event.phase.name.value in phases:
                self.phases[event.phase.name.value] = event.status.value
            elif isinstance(event, (events.NonFatalError, events.FatalError)):
                self.failures.append(f"engine error: {event}")

    def _install(self, schema) -> None:
        from weightsync.transport.broadcast import free_port

        trainers, statuses, specs = self.trainers, self.statuses, self.specs

        @schema.hook("flatmap_case").apply_to(method="POST", path="/sessions")
        def sometimes_a_real_session(ctx, case):
            def real(kind: str):  # in the stateful phase always: where sessions go on
                if (kind != "as-generated" or _phase(case) == "stateful") and \
                        isinstance(case.body, dict):
                    # assigned (not mutated), so schemathesis re-labels the case positive;
                    # "duplicate" names a tensor twice (a 422, found in one pass)
                    tensors = specs + specs[:1] if kind == "duplicate" and \
                        _phase(case) != "stateful" else specs
                    case.body = {**case.body, "tensors": tensors, "host": "127.0.0.1",
                                 "port": free_port("127.0.0.1"), "partial": False}
                return case

            return st.sampled_from(["as-generated", "real", "duplicate"]).map(real)

        malformed = self.malformed

        @schema.hook("flatmap_case").apply_to(method="POST", path="/reload")
        def sometimes_a_malformed_file(ctx, case):
            def pick(i: int):
                if i < len(malformed) and isinstance(case.body, dict):
                    case.body = {**case.body, "path": malformed[i]}
                return case

            return st.integers(0, len(malformed) + 3).map(pick)  # mostly a malformed file

        reached = self.reached

        @schema.hook
        def after_call(ctx, case, response):
            key = f"{case.method} {case.operation.path}"
            statuses.setdefault(key, []).append(response.status_code)
            body = case.body if isinstance(case.body, dict) else {}
            if key == "POST /reload" and isinstance(body.get("path"), str) and \
                    body["path"] in malformed:
                reached["malformed file"].append(response.status_code)
            tensors = body.get("tensors") if isinstance(body.get("tensors"), list) else []
            names = [t["name"] for t in tensors
                     if isinstance(t, dict) and isinstance(t.get("name"), str)]
            if key == "POST /sessions" and len(names) != len(set(names)):
                reached["duplicate names"].append(response.status_code)
            if key == "POST /sessions" and response.status_code == 201:
                trainers.start(response.json(), _phase(case))
            sid = (case.path_parameters or {}).get("session")
            if sid in trainers.closed and response.status_code in (200, 409):
                trainers.closed[sid].set()  # committed or aborted: the trainer may go


def test_schemathesis_every_phase_and_check_zero_5xx(service, client, tiny_model, ckpt_root):
    """Examples, coverage and fuzzing over every operation; then the stateful phase over the
    session operations (and /status): with /pause, /reload and the rest in the mix, nearly
    every session it opens would meet a paused or busy fleet (409), and those operations'
    own sequences are covered by the other phases and by dedicated tests."""
    import schemathesis
    from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

    from weightsync.transport.packing import named_tensors, spec_of

    tensors = dict(named_tensors(load_trainer_model(tiny_model)))
    trainers = Trainers(service.url, tensors)
    run = Run(service.url, trainers, [spec_of(n, t).model_dump() for n, t in tensors.items()],
              malformed_checkpoints(ckpt_root))

    @schemathesis.hook
    def before_call(ctx, case, **kwargs):
        if case.operation.path == "/reload" and isinstance(case.body, dict) and \
                case.body.get("path") in run.malformed:
            # a fleet the fuzzer paused or put to sleep answers 409 before any file is read
            # (at c75e380 all 5 malformed-file calls met one): make it serve, so the file is
            # read and refused
            restore(client)
        if case.operation.path == "/sessions/{session}/commit" and isinstance(case.body, dict) \
                and isinstance(case.body.get("checksums"), list):
            sums = trainers.checksums_for((case.path_parameters or {}).get("session"))
            if sums is not None:
                trainers.committed += 1
                case.body = {**case.body, "checksums": sums}

    try:
        run(["examples", "coverage", "fuzzing"])
        restore(client)  # fuzzing may leave engines paused
        run(["stateful"], path_regex="^/(sessions|status)")
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)
        trainers.finish()
    codes = [c for cs in run.statuses.values() for c in cs]
    print(f"\nschemathesis: {len(codes)} calls, "
          f"{ {c: codes.count(c) for c in sorted(set(codes))} }; phases {run.phases}; "
          f"sessions opened {trainers.opened}, commits carrying the trainer's checksums "
          f"{trainers.committed}")
    for key, cs in sorted(run.statuses.items()):
        if not key.startswith(("DELETE", "PATCH", "PUT", "TRACE", "QUERY", "OPTIONS")):
            print(f"  {key}: {len(cs)} -> {sorted(set(cs))}")
    print(f"  reached: { {k: sorted(set(v)) for k, v in run.reached.items()} } "
          f"({ {k: len(v) for k, v in run.reached.items()} } calls)")
    assert not run.failures, "\n".join(dict.fromkeys(run.failures))
    # the malformed files and duplicate names of the outside test were reached: refused, never 5xx
    assert all(422 in cs for cs in run.reached.values()), run.reached
    assert all(c < 500 for cs in run.reached.values() for c in cs), run.reached
    assert not trainers.errors, trainers.errors
    assert max(codes) < 500
    # the schema has no examples, so that phase has nothing to run
    assert run.phases.get("examples") in ("success", "skip"), run.phases
    assert [run.phases.get(p) for p in ("coverage", "fuzzing", "stateful")] == \
        ["success"] * 3, run.phases
    assert len(codes) >= 500
    assert trainers.opened.get("stateful") and trainers.committed
    assert 200 in run.statuses.get("POST /sessions/{session}/commit", [])  # a session worked
