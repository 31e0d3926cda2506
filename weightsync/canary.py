"""The trainer's half of a sync's canary (``types.Canary``): reference logprobs of a short
token sequence under the weights about to be sent, computed with the trainer's own model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightsync.types import Canary


def reference(model: Any, token_ids: Sequence[int], tolerance: float) -> Canary:
    """A ``Canary`` from a transformers causal LM (``model(ids).logits``): the log-softmax of
    each of ``token_ids[1:]`` given the tokens before it, in fp32, teacher-forced."""
    import torch

    ids = torch.tensor([list(token_ids)], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    lps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return Canary(token_ids=tuple(int(t) for t in token_ids),
                  logprobs=tuple(float(x) for x in lps.tolist()), tolerance=tolerance)
