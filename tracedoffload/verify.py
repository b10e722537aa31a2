"""Is the offloaded model the model? The same prompt, greedy, with every layer resident and then
offloaded: the tokens of both, and per position the largest absolute difference of their logits.

Up to the first position where the tokens differ, both runs have seen the same tokens, so their
logits there must agree: an offloaded layer computes with the same weights, copied, and the same
kernels. On a CPU they agree bit for bit; on a GPU a copy into a device slot may reach kernels
that round differently, hence a tolerance (`atol`). The verdict names the first position whose
tokens differ or whose logits differ by more than `atol`; after it the runs no longer see the
same input, so nothing after it is compared.

`corrupt_layer`, a fault drill, zeroes the device copy of one offloaded layer after each of its
transfers (`faults.CorruptTransfers`): the verdict must then name a position.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tracedoffload._exceptions import ConfigError, TracedOffloadError

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads DEFAULT_ATOL without it
    import torch

    from tracedoffload.config import OffloadConfig

DEFAULT_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Position:
    index: int  # from 0, the first generated token
    resident_token: int | None  # None: that run had stopped
    offloaded_token: int | None
    max_abs_logit_diff: float | None  # None where one run had no logits


@dataclasses.dataclass(frozen=True)
class Verdict:
    positions: tuple[Position, ...]  # up to and including the first divergence
    first_divergence: int | None  # the index of the first diverging position; None: identical
    atol: float
    prompt_tokens: int
    offloaded_layers: tuple[int, ...]

    @property
    def identical(self) -> bool:
        return self.first_divergence is None

    @property
    def max_abs_logit_diff(self) -> float:
        return max((p.max_abs_logit_diff for p in self.positions if p.max_abs_logit_diff is not None), default=0.0)


def verify_offload(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    config: OffloadConfig,
    *,
    system: str | None = None,
    raw: bool = False,
    atol: float = DEFAULT_ATOL,
    corrupt_layer: int | None = None,
) -> Verdict:
    """Generate greedily with every layer resident on `config`'s device, then offloaded by
    `config`, and compare (see the module docstring). The model is left where it was.

    Raises:
        ConfigError: `atol` negative, `corrupt_layer` not an offloaded layer.
        TracedOffloadError: the model does not fit on the device with every layer resident; a
            prompt `encode_prompt` refuses.
    """
    import torch

    from tracedoffload.generation import encode_prompt
    from tracedoffload.offloader import offload, resolve_device

    if not atol >= 0:
        raise ConfigError("atol", atol, "a number >= 0")
    encoded = encode_prompt(tokenizer, prompt, system=system, raw=raw)
    device = resolve_device(config.device)
    home = next(model.parameters()).device
    try:
        try:
            model.to(device)
        except torch.cuda.OutOfMemoryError:
            raise TracedOffloadError(f"the model does not fit on {device} with every layer resident, which verify compares against") from None
        resident = _greedy(model, tokenizer, encoded, max_new_tokens, device)
        offloader = offload(model, config)
        try:
            if corrupt_layer is not None:
                _inject_corruption(offloader, corrupt_layer)
            offloaded = _greedy(model, tokenizer, encoded, max_new_tokens, device)
            offloaded_layers = tuple(offloader.offloaded_indices)
        finally:
            offloader.detach()
    finally:
        model.to(home)
    return _compare(resident, offloaded, atol, encoded["input_ids"].shape[1], offloaded_layers)


def _greedy(model: torch.nn.Module, tokenizer: Any, encoded: dict[str, torch.Tensor], max_new_tokens: int, device: torch.device) -> tuple[list[int], list[torch.Tensor]]:
    """The generated tokens and, per position, the raw logits (on the host, float32)."""
    import torch

    from tracedoffload.generation import eos_ids, pad_id

    stop = sorted(eos_ids(model)) or None
    pad = pad_id(tokenizer)
    with torch.inference_mode():
        output = model.generate(
            encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = output.sequences[0, encoded["input_ids"].shape[1] :].tolist()
    return tokens, [step[0].float().cpu() for step in output.logits]


def _compare(resident: tuple[list[int], list[torch.Tensor]], offloaded: tuple[list[int], list[torch.Tensor]], atol: float, prompt_tokens: int, layers: tuple[int, ...]) -> Verdict:
    (tokens_r, logits_r), (tokens_o, logits_o) = resident, offloaded
    positions = []
    first = None
    for index in range(max(len(tokens_r), len(tokens_o))):
        token_r = tokens_r[index] if index < len(tokens_r) else None
        token_o = tokens_o[index] if index < len(tokens_o) else None
        both = index < len(logits_r) and index < len(logits_o)
        diff = float((logits_r[index] - logits_o[index]).abs().max()) if both else None
        positions.append(Position(index, token_r, token_o, diff))
        if token_r != token_o or diff is None or diff > atol:
            first = index
            break
    return Verdict(tuple(positions), first, atol, prompt_tokens, layers)


def _inject_corruption(offloader: Any, layer: int) -> None:
    from tracedoffload.faults import CorruptTransfers

    if layer not in offloader.offloaded_indices:
        raise ConfigError("corrupt_layer", layer, f"an offloaded layer: one of {list(offloader.offloaded_indices)}")
    offloader.timeline = CorruptTransfers(offloader.timeline, offloader, layer)
