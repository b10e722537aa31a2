"""The engine's per-request processors, in transformers' continuous-batching chain, in one order.

transformers' manager applies temperature, top-k and top-p per request (its own warpers, made
from the generation config). Around them, before the manager starts (its argument storage is
sized from the list when its thread starts), this puts:

1. `RawLogprobs` first: the raw log-softmax of the rows that asked for log-probabilities;
2. `RequestPenalties` next, before any warper, as `generate` orders them;
3. the manager's warpers;
4. `RequestMinP`, after top-p;
5. `SeededSampler` last: it draws seeded rows and rows wanting log-probabilities itself.
"""

from __future__ import annotations

from typing import Any

from tracedoffload.serve.logprobs import LogprobLedger, RawLogprobs
from tracedoffload.serve.penalties import RequestMinP, RequestPenalties
from tracedoffload.serve.seeded_sampling import SeededSampler


def install_request_processors(processors: Any, ledger: LogprobLedger) -> None:
    """Add ours to a manager's processor list (`manager.logit_processor`), in the order above."""
    first, penalties, min_p, last = RawLogprobs(ledger), RequestPenalties(), RequestMinP(), SeededSampler(ledger)
    chain = processors.logits_processor
    chain.insert(0, first)
    chain.insert(1, penalties)
    chain.append(min_p)
    chain.append(last)
    for processor in (first, penalties, min_p, last):
        processors.supported_keys.update(processor.supported_kwargs)
    processors.tensors_required += 4
    processors.do_processing = True
