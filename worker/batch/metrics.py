"""Every metric, defined once, from the next-token logits at a run's last position.

Each method (the one-trace path, the fast recompute path) ends in these functions, so a
metric means the same thing whichever path computed it:

- `logit_diff`: mean logit of the `correct` answers minus mean logit of the `incorrect` ones
  (with one answer each, the classic logit difference). It reads only the answer columns.
- `logprob`: log of the total probability of the `correct` answers.
- `prob_diff`: total probability of `correct` minus total probability of `incorrect`.
- `kl`: KL(donor || run), in nats, summed over the vocabulary: how far the run's next-token
  distribution is from the donor run's. 0 for the donor itself.

All but `logit_diff` need the whole vocabulary row (for the softmax's normaliser); `kl` also
needs the donor's distribution (`DonorDistribution`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.contract.pairs import Pair


@dataclass(frozen=True)
class Answers:
    """Per row: the correct then the incorrect answer ids, padded to one width, and each id's
    sign (+1 correct, -1 incorrect, 0 padding)."""

    ids: torch.Tensor  # [rows, K] long
    sign: torch.Tensor  # [rows, K] float

    @classmethod
    def of(cls, pairs: Sequence[Pair]) -> Answers:
        width = max((len(p.correct_ids) + len(p.incorrect_ids) for p in pairs), default=1)
        ids, sign = [], []
        for p in pairs:
            row = [*p.correct_ids, *p.incorrect_ids]
            padding = width - len(row)
            ids.append(row + [p.correct_ids[0]] * padding)
            sign.append([1.0] * len(p.correct_ids) + [-1.0] * len(p.incorrect_ids) + [0.0] * padding)
        return cls(
            torch.tensor(ids, dtype=torch.long).view(len(pairs), width), torch.tensor(sign).view(len(pairs), width)
        )

    def __getitem__(self, rows) -> Answers:
        return Answers(self.ids[rows], self.sign[rows])

    def to(self, device: torch.device) -> Answers:
        return Answers(self.ids.to(device), self.sign.to(device))


def reads_vocabulary(metric: str) -> bool:
    """Whether `metric` needs the whole vocabulary row, not just the answers' logits."""
    return metric != "logit_diff"


def answer_logit_diff(answer_logits: torch.Tensor, answers: Answers) -> torch.Tensor:
    """`logit_diff` from the logits of `answers.ids` alone ([rows, K])."""
    correct, incorrect = (answers.sign > 0).float(), (answers.sign < 0).float()
    answer_logits = answer_logits.float()
    return (answer_logits * correct).sum(1) / correct.sum(1) - (answer_logits * incorrect).sum(1) / incorrect.sum(1)


@dataclass(frozen=True)
class DonorDistribution:
    """What `kl` compares a run against, per row: the donor run's next-token probabilities and
    their negative entropy (sum of p log p)."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> DonorDistribution:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probs = log_probs.exp()
        return cls(probs, torch.einsum("rv,rv->r", probs, log_probs))

    def __getitem__(self, rows) -> DonorDistribution:
        return DonorDistribution(self.probs[rows], self.neg_entropy[rows])


def vocabulary_metric(
    metric: str, logits: torch.Tensor, answers: Answers, donor: DonorDistribution | None = None
) -> torch.Tensor:
    """`metric` per row from the whole last-position logits [rows, V]; `donor`: each row's donor
    distribution, for `kl`. One pass over the vocabulary for the softmax's normaliser, one more
    for `kl`; no [rows, V] temporaries."""
    if metric == "logit_diff":
        return answer_logit_diff(logits.gather(1, answers.ids), answers)
    logits = logits.float()
    normaliser = torch.logsumexp(logits, dim=-1)  # log p = logits - normaliser
    if metric == "kl":  # sum p_d (log p_d - log p), where the p_d sum to 1
        return donor.neg_entropy - torch.einsum("rv,rv->r", donor.probs, logits) + normaliser
    answer = logits.gather(1, answers.ids) - normaliser[:, None]
    if metric == "logprob":
        return torch.logsumexp(answer.masked_fill(answers.sign <= 0, float("-inf")), dim=1)
    if metric == "prob_diff":
        return (answer.exp() * answers.sign).sum(1)
    raise ValueError(f"unknown metric {metric!r}")
