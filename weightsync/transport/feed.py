"""What the legs know of a feed beyond its mapping (``weightsync.sources`` makes feeds)."""

from __future__ import annotations

from typing import Any


class HeldFeed(dict):
    """A feed handed out again, the same object, for as long as every tensor in it stays
    where it is (a module's kept views: ``ModuleSource``). A leg may key what it derived
    from the tensors' addresses on ``token`` instead of asking each tensor again (a MoE's
    experts are ~1,150 views)."""

    def __init__(self, items: dict[str, Any]) -> None:
        super().__init__(items)
        self.token = object()  # (held by whoever keys on it: never reused while it matters)
