"""The real tiny model with its token choices forced to follow a script: exact outputs through real code.

`ScriptedModel` wraps a loaded Kosmos-2.5 and, after each real forward pass, overwrites the last
position's logits so that the greedy choice is the next token of a fixed script (a logits processor
by another name). Every row of every batch follows the same script. `forcing` wraps
`model.loading.load_runner` so that each runner it loads is forced so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ScriptedModel:
    """Delegate to the real model; force each row's next greedy token to follow `script`."""

    def __init__(self, model: Any, script: list[int], *, prompt_length: int, eos: int, pad: int) -> None:
        self.model = model
        self.script = script
        self.prompt_length = prompt_length
        self.eos = eos
        self.pad = pad

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        output = self.model(**kwargs)
        logits = output.logits
        rows = logits.shape[0]
        positions = kwargs.get("position_ids")
        if positions is None:  # the prefill: the first generated token
            steps = [0] * rows
        else:  # the row's own position counts its prompt and the tokens it has generated
            steps = [int(p) - (self.pad + 1) - self.prompt_length + 1 for p in positions[:, -1]]
        forced = torch.full_like(logits[:, -1, :], float("-inf"))
        for row, step in enumerate(steps):
            forced[row, self.script[step] if step < len(self.script) else self.eos] = 0.0
        logits[:, -1, :] = forced
        return output


def forcing(load: Callable[[Any], Any], raw: str) -> Callable[[Any], Any]:
    """Return `load` (a `load_runner`) with every runner it loads forced to generate `raw`."""

    def load_forced(settings: Any) -> Any:
        loaded = load(settings)
        ids = loaded.processor.tokenizer.encode(raw, add_special_tokens=False)
        loaded.model = ScriptedModel(
            loaded.model, ids, prompt_length=loaded.prompt_length, eos=loaded.eos_id, pad=loaded.pad_id
        )
        return loaded

    return load_forced
