"""The task metric on a run's held-out sets, each worker scoring its shard; sums are added across
workers, so the score is the same for any number of workers."""

from __future__ import annotations

import torch

from raylin.config import RunConfig
from raylin.data.task_data import TaskData
from raylin.models.families import state_mask
from raylin.scoring import finish_scores, score_sums, score_width
from raylin.train.batch import model_inputs
from raylin.train.collective import sum_across_workers


@torch.no_grad()
def evaluate(model, data: TaskData, config: RunConfig, device, rank: int, world: int,
             sets: list[str] | None = None) -> dict[str, float]:
    """The task metric on the held-out sets ``sets`` (default all: the main one, "", and every
    evaluation set), each worker scoring its shard. The main set's scores are ``{metric: value}``,
    an extra set's ``{f"{name}_{metric}": value}``. A bf16 model is fed bf16 features and scored
    from fp32 logits."""
    model.eval()
    dtype = next(model.parameters()).dtype  # float inputs (audio features) follow a bf16 model
    # No activations are kept for a backward pass, so a worker scores 4x its training batch at once
    # (fewer, larger forwards: what costs most on a CPU is the number of calls).
    batch_size = max(4 * config.train.batch_size // world, 8)
    scores: dict[str, float] = {}
    for name, size in data.eval_sets.items():
        if sets is not None and name not in sets:
            continue
        sums = torch.zeros(score_width(config.task_kind), dtype=torch.float64, device=device)
        shard = list(range(rank, size, world))
        for start in range(0, len(shard), batch_size):
            batch = {k: v.to(device) for k, v in data.eval_batch(name, shard[start : start + batch_size]).items()}
            inputs = model_inputs(batch, dtype)
            logits = model(**inputs).logits.float()  # scores in fp32 whatever the model computes in
            sums += score_sums(config.task_kind, logits, batch, state_mask(model, batch)).double()
        prefix = f"{name}_" if name else ""
        scores |= {prefix + k: v for k, v in finish_scores(config.task_kind, sum_across_workers(sums)).items()}
    model.train()
    return scores
