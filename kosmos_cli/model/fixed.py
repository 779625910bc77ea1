"""Fixed batches through transformers' own `generate` (`--compile`: a static KV cache, torch.compile'd).

Every page of a batch starts together and the batch ends with its longest page; a batch that fails
is retried in halves. The adapters that carry kosmos's rules into `generate` (greedy config, token
probabilities, loop stopping) live here too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kosmos_cli.errors import GenerationError, first_line
from kosmos_cli.model import Request
from kosmos_cli.model.encoding import Encoded, Encoder
from kosmos_cli.model.failures import PAGE_ERRORS, page_error, release_memory
from kosmos_cli.repetition import Decode, Loop, LoopDetector, LoopRule, find_loop
from kosmos_cli.values import Finish, Generation

if TYPE_CHECKING:
    import torch

    from kosmos_cli.model.runner import KosmosRunner

logger = logging.getLogger(__name__)


def generate_fixed(
    runner: KosmosRunner, pages: Encoder
) -> Iterator[tuple[Request, Generation | GenerationError]]:
    """Generate in fixed batches of `batch_size`, halving a batch that fails."""
    while not pages.exhausted:
        batch: list[tuple[Request, Encoded]] = []
        for request, encoded in pages.take(runner.batch_size, wait_for=runner.batch_size):
            if isinstance(encoded, GenerationError):
                yield request, encoded
            else:
                batch.append((request, encoded))
        if batch:
            yield from _generate_or_split(runner, batch)


def _generate_or_split(
    runner: KosmosRunner, batch: list[tuple[Request, Encoded]]
) -> Iterator[tuple[Request, Generation | GenerationError]]:
    try:
        generations = generate_static(runner, [encoded for _, encoded in batch])
    except PAGE_ERRORS as error:  # a failing batch: retried in halves, then per-page errors
        if len(batch) == 1:
            yield batch[0][0], page_error(error)
            return
        logger.warning("batch of %d failed (%s); retrying in halves", len(batch), first_line(error))
        release_memory()
        half = len(batch) // 2
        yield from _generate_or_split(runner, batch[:half])
        yield from _generate_or_split(runner, batch[half:])
        return
    yield from zip((request for request, _ in batch), generations, strict=True)


def generate_static(runner: KosmosRunner, encoded: Sequence[Encoded]) -> list[Generation]:
    """Run one fixed batch through `model.generate` (a static cache, compiled, with `--compile`)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    inputs = {key: torch.cat([e.inputs[key] for e in encoded]).to(runner.device) for key in encoded[0].inputs}
    config = greedy_config(runner.model, runner.max_new_tokens)
    if runner.settings.ignore_eos:
        config.min_new_tokens = runner.max_new_tokens
    if runner.settings.compile:
        config.cache_implementation = "static"
        config.compile_config = compile_config(runner.device)
    stopping = StoppingCriteriaList()
    if runner.loop_rule is not None:
        stopping.append(_loop_stopping_criteria(len(encoded), runner.loop_rule, runner.decode_raw))
    recorder = _probability_recorder(len(encoded))
    with torch.inference_mode():
        output = runner.model.generate(
            **inputs,
            generation_config=config,
            stopping_criteria=stopping,
            logits_processor=LogitsProcessorList([recorder]),
        )
    new_ids = output[:, inputs["input_ids"].shape[1] :].cpu().tolist()
    new_probs = recorder.rows()
    generations = []
    for ids, probs, page in zip(new_ids, new_probs, encoded, strict=True):
        ids, finish, loop = _finish_of(runner, ids)
        generations.append(runner.to_generation(ids, probs[: len(ids)], page.resized_size, finish, loop))
    return generations


def _finish_of(runner: KosmosRunner, ids: list[int]) -> tuple[list[int], Finish, Loop | None]:
    """Cut a fixed-batch row at its EOS or loop and say why it ended."""
    if runner.eos_id in ids and not runner.settings.ignore_eos:
        ids = ids[: ids.index(runner.eos_id)]
        finish = Finish.EOS
    else:
        finish = Finish.LENGTH
    loop = find_loop(ids, runner.loop_rule, runner.decode_raw) if runner.loop_rule is not None else None
    if loop is not None:
        return ids[: loop.keep], Finish.LOOP, loop
    return ids, finish, None


def greedy_config(model: Any, max_new_tokens: int) -> Any:
    """Build an explicit greedy generation config, ignoring what the checkpoint ships."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        bos_token_id=shipped.bos_token_id,
        eos_token_id=shipped.eos_token_id,
        pad_token_id=shipped.pad_token_id,
    )


def compile_config(device: str) -> Any:
    """How `--compile` compiles the decode step: CUDA graphs on GPU, plain inductor elsewhere."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.startswith("cuda") else "default")
    config._compile_all_devices = True  # type: ignore[assignment]  # transformers only auto-compiles on accelerators otherwise
    return config


def _probability_recorder(rows: int) -> Any:
    """A transformers LogitsProcessor that notes the probability of each row's greedy choice, step by step.

    It runs after the generation config's own processors, so the token it sees win is the one
    `generate` picks; the scores are left as they are.
    """
    import torch
    from transformers import LogitsProcessor

    from kosmos_cli.model.runner import token_probabilities

    class ProbabilityRecorder(LogitsProcessor):
        def __init__(self) -> None:
            self.steps: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.steps.append(token_probabilities(scores, scores.argmax(dim=-1)))
            return scores

        def rows(self) -> list[list[float]]:
            """Return each row's probabilities, one per generated token."""
            if not self.steps:
                return [[] for _ in range(rows)]
            return torch.stack(self.steps, dim=1).cpu().tolist()

    return ProbabilityRecorder()


def _loop_stopping_criteria(rows: int, rule: LoopRule, decode: Decode) -> Any:
    """A transformers StoppingCriteria that stops each row of a fixed batch when its output loops."""
    import torch
    from transformers import StoppingCriteria

    class LoopStopping(StoppingCriteria):
        def __init__(self) -> None:
            self.detectors = [LoopDetector(rule, decode) for _ in range(rows)]
            self.stopped = [False] * rows

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if not self.stopped[row] and self.detectors[row].push(token) is not None:
                    self.stopped[row] = True
            return torch.tensor(self.stopped, device=input_ids.device)

    return LoopStopping()
