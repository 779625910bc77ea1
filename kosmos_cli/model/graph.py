"""`--cuda-graph`: the decode step of every slot of a `FixedSlots` cache, captured once as a CUDA graph."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kosmos_cli.model.slots import FixedSlots, device_guard

if TYPE_CHECKING:
    import torch

    from kosmos_cli.model.continuous import Batch
    from kosmos_cli.model.runner import KosmosRunner


class CapturedStep:
    """A decode step of every slot of a `FixedSlots` cache, its shapes fixed: captured once as a CUDA
    graph and replayed at each step, while pages join and leave as without it.

    A free slot decodes a pad token at column 0 of its own slot; rows never mix (linears and norms
    work row by row, the attention reads each row's own slot), so what it computes is ignored, and a
    page that takes the slot prefills over that column. Each step copies the rows' last tokens and
    lengths in by slot and reads every slot's next token and probability out. Made while every slot
    is free (its warm-up steps write column 0 of each).

    A graph replays the addresses it captured: every tensor the step reads is made here, kept for
    the step's life and only copied into, never rebound (a prefill points the cache at tensors of its
    own; the graph never sees them). Off CUDA the same step runs eagerly on the same tensors, so the
    tests check its logic, and that it reads nothing else, on the CPU.
    """

    def __init__(self, runner: KosmosRunner, cache: FixedSlots) -> None:
        import torch

        self._runner, self._cache = runner, cache
        capture = runner.device.startswith("cuda")
        self._host = torch.zeros((2, cache.slots), dtype=torch.long, pin_memory=capture)  # filled each step
        with torch.inference_mode(), device_guard(runner.device):
            self._inputs = torch.zeros((2, cache.slots), dtype=torch.long, device=runner.device)
            self.input_ids, self.columns = self._inputs[0][:, None], self._inputs[1]
            self.slots = torch.arange(cache.slots, device=runner.device)  # row i in slot i
            self._point_cache()
            self._graph = None
            if not capture:
                return
            warm_up = torch.cuda.Stream(device=runner.device)
            warm_up.wait_stream(torch.cuda.current_stream(runner.device))
            with torch.cuda.stream(warm_up):
                for _ in range(2):  # cuBLAS and Triton set themselves up outside the capture
                    self._forward()
            torch.cuda.current_stream(runner.device).wait_stream(warm_up)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._tokens, self._probs = self._forward()

    def _point_cache(self) -> None:
        """Make the cache's next forwards steps of every slot, reading this step's own tensors."""
        self._cache.at_every_slot(self.slots, self.columns)

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        runner = self._runner
        position_ids = torch.where(
            self.input_ids == runner.pad_id, runner.pad_id, runner.pad_id + 1 + self.columns[:, None]
        )
        output = runner.model(
            input_ids=self.input_ids,
            **{runner.cache_argument: self._cache},
            position_ids=position_ids,
            use_cache=True,
            slot_cache=self._cache,
        )
        return runner.pick(output.logits[:, -1, :])

    def __call__(self, batch: Batch) -> tuple[list[int], list[float]]:
        """Run one step for the batch's rows; return each row's next token and its probability."""
        import torch

        self._host[0].fill_(self._runner.pad_id)
        self._host[1].zero_()
        for row in batch.rows:
            self._host[0, row.slot] = row.ids[-1]  # the token it chose last (a running row never ends on EOS)
            self._host[1, row.slot] = row.cached
        with torch.inference_mode(), device_guard(self._runner.device):
            self._inputs.copy_(self._host, non_blocking=True)
            if self._graph is not None:
                self._graph.replay()
            else:  # prefills pointed the cache at their own slots since
                self._point_cache()
                self._tokens, self._probs = self._forward()
        tokens, probs = self._tokens.tolist(), self._probs.tolist()
        for row in batch.rows:
            row.cached += 1
        return [tokens[row.slot] for row in batch.rows], [probs[row.slot] for row in batch.rows]
