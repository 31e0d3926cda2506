"""How a transfer plan travels: a ``PlanMessage`` carries the plan's version as its own value,
beside its body's key and, unless the receiver holds that body already, the body's JSON.

The kernel-layout plan is the same every sync but for its version, and a MoE's is large:
Qwen3-MoE with 128 experts, 3 layers, ~128 KB (every expert's tensors are named); Ray passes
an argument over 100 KB through its object store (on this project's 2-core box a call took
7.6 ms with 128 KB, 1.2 ms with 1 KB). So a receiver keeps the body it was last sent whole
(``HeldPlan``; each hop its own: the engine host for the trainer, and every worker for the
host), the host says which it holds (``BeginReply.plan_key``), and the sender names that body
by key from then on (``plan_message``). The sender's body JSON is dumped once per body
(``types.PlanBody``, shared by the plan's copies at other versions); a worker parses it once
per body, and a repeat sync parses only its ~100-byte message. The body rides in the message
as a string, so that a host forwards it to its workers without parsing it (a 125 KB body:
1.9 ms to parse, 0.13 ms to read as a string in its message, on the 2-core box).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from weightsync.errors import PlanNotHeld
from weightsync.types import PlanBody, TransferPlan


class PlanMessage(BaseModel):
    """A plan on the wire: its version, its body's key (``PlanBody.key``) and the body's JSON,
    or no body where the receiver holds the one the key names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    key: str = Field(min_length=1)
    body: str | None = None  # a PlanBody's JSON; None: named by key alone

    def by_key(self) -> PlanMessage:
        """This message naming its body by key alone, for a receiver that holds it."""
        return self.model_copy(update={"body": None})


def plan_message(plan: TransferPlan, held: str | None = None) -> str:
    """The message (JSON) of ``plan`` for a receiver that holds the body keyed ``held``
    (``BeginReply.plan_key``; None: none known): the body by key when it is this plan's,
    else whole."""
    body = plan.body()
    message = PlanMessage(version=plan.version, key=body.key, body=body.json_text)
    return (message.by_key() if held == body.key else message).model_dump_json()


class HeldPlan:
    """The plan body a receiver was last sent whole, kept by its key so that its sender may
    name it by key from then on. An engine host only forwards it (``read``); a worker parses
    it once while it holds it (``plan``)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self._text: str | None = None  # the body's JSON
        self._body: PlanBody | None = None  # ... parsed, once asked for (``plan``)

    def read(self, message: str) -> PlanMessage:
        """``message`` parsed, with its body: the one it carries (held from now on) or the
        held one it names. ``PlanNotHeld`` when it names a body not held here (nothing held
        changes then)."""
        msg, text = self._take(message, parse=False)
        return msg if msg.body is not None else msg.model_copy(update={"body": text})

    def plan(self, message: str) -> TransferPlan:
        """The plan ``message`` carries or names (``read``), at its version: the body is
        parsed once while it is held, so a repeat sync at a new version parses no body. A
        malformed body raises pydantic's ``ValidationError``, and is not held."""
        msg, text = self._take(message, parse=True)
        if self._body is None:  # (held by ``read``, which does not parse)
            self._body = PlanBody.model_validate_json(text)
        return self._body.at(msg.version)

    def _take(self, message: str, parse: bool) -> tuple[PlanMessage, str]:
        """(``message`` parsed, the JSON of the body it carries or names), holding a body it
        carries from now on (parsed first, with ``parse``)."""
        msg = PlanMessage.model_validate_json(message)
        if msg.body is None:
            if msg.key != self.key or self._text is None:
                raise PlanNotHeld(f"plan {msg.key} is not held here (holding {self.key}): "
                                  "send its JSON")
            return msg, self._text
        if msg.key != self.key:
            body = PlanBody.model_validate_json(msg.body) if parse else None
            self.key, self._text, self._body = msg.key, msg.body, body
        return msg, msg.body
