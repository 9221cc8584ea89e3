"""Ours with a bias-relative active set — an extension beyond the paper, registered as `fim_relative`.

The paper constrains the samples with the largest Fisher trace. A trace is large for two different reasons: the
sample conflicts with the shortcut the model has learnt (what debiasing must fix), or it is ambiguous (a blurred
digit, whatever its colour). This variant tells them apart as Learning from Failure does with losses: a
bias-amplified model f_b trains alongside on the same batches with generalized cross-entropy (LfF's GCE, which
fits the easy, shortcut-aligned samples first), and the active set ranks samples by their relative trace

    r_i = T_b,i / (T_b,i + T_d,i)   in [0, 1]

with T_b and T_d the same-scope traces of f_b and of the run's model f_d. An ambiguous sample is hard for both (r near
1/2); a bias-conflicting one is hard for f_b and not for f_d once f_d starts to learn it (r near 1). The constraint
itself, eps, the multipliers and the dual ascent are those of `fim` on T_d: only who is constrained changes (the memory
of last-visit scores, and its logged `trace_enrichment`, holds r). Scopes `logits` (traces from each model's forward)
and `full` (each model's per-sample trace over its parameters, each in units of its own mean trace at calibration). No
group labels are used.

Cost: f_b's forward and GCE backward every step (and, for the full scope, its per-sample traces: one more backward
of its forward) on top of `fim`'s step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..fisher import ParameterTrace
from ..models import buffers_kept
from .base import Card, Choice, Float, param
from .fim import SCOPE_HELP, FIMParams, FisherConstrained
from .lff import Q_HELP, gce

RELATIVE_SCOPES = ("logits", "full")


@dataclass
class FIMRelativeParams(FIMParams):
    scope: str = param("logits", SCOPE_HELP, choices=RELATIVE_SCOPES)
    q: float = param(0.7, Q_HELP, gt=0.0, high=1.0)


class FisherRelative(FisherConstrained):
    Params = FIMRelativeParams
    # buffers (registered in __init__), declared for the type checker
    biased_memory: torch.Tensor
    biased_scale: torch.Tensor
    SPACE = {**FisherConstrained.SPACE, "scope": Choice(RELATIVE_SCOPES), "q": Float(0.05, 0.95)}
    card = Card("Ours + bias-relative K (beyond the paper)", "Fisher constraint (beyond the paper)",
                "the paper; the bias-amplified model of Nam et al., NeurIPS 2020", order=3)

    def __init__(self, params: FIMRelativeParams, train, **kw):
        super().__init__(params, train, **kw)
        self.register_buffer("biased_memory", torch.zeros(self.n_train))  # T_b of each sample at its last visit
        self.register_buffer("biased_scale", torch.tensor(1.0))  # full scope: f_b's mean trace at calibration
        self.biased: nn.Module | None = None  # f_b and its tracer: built in setup
        self._biased_tracer: ParameterTrace | None = None

    def setup(self, ctx):
        super().setup(ctx)
        self.biased = self.add_auxiliary(ctx)
        self._biased_tracer = ParameterTrace(self.biased)

    def score(self, trace, idx):
        t_b = self.biased_memory[idx].to(trace.dtype)
        return t_b / (t_b + trace).clamp(min=1e-12)

    def biased_traces(self, x, y) -> torch.Tensor:
        """T_b of the batch as f_b's training step sees it (train mode; its BatchNorm statistics kept)."""
        biased, tracer = self.biased, self._biased_tracer
        assert biased is not None and tracer is not None, "setup() builds them"
        with buffers_kept(biased):
            biased.train()
            return self.scope.model_traces(self, biased, lambda: tracer, x, y)

    def calibration_traces(self, model, train_batches):
        traces = [(self.scope.model_traces(self, model, lambda: self.tracer(model), x, y) / self.trace_scale,
                   self.biased_traces(x, y), idx) for x, y, idx in train_batches(inputs=True)]
        if self.scope.unit_mean:
            self.trace_scale.fill_(torch.cat([t for t, _, _ in traces]).mean().clamp(min=1e-12))
            self.biased_scale.fill_(torch.cat([t for _, t, _ in traces]).mean().clamp(min=1e-12))
        for _, t_b, idx in traces:
            self.biased_memory[idx] = (t_b / self.biased_scale).to(self.biased_memory.dtype)
        return [(t / self.trace_scale, idx) for t, _, idx in traces]

    def auxiliary_loss(self, batch, autocast):
        biased, tracer = self.biased, self._biased_tracer
        assert biased is not None and tracer is not None, "setup() builds them"
        biased.train()
        recording = self.scope.recording(tracer) if self.constrained else contextlib.nullcontext((None, None))
        with recording as (_, saved), autocast():
            logits_b = biased(batch.x).float()
        if self.constrained:  # f_b's traces of this batch, before its step (as f_d's are taken before f_d's)
            t_b = self.scope.recorded_traces(self, tracer, logits_b, batch.y, saved) / self.biased_scale
            self.biased_memory[batch.idx] = t_b.to(self.biased_memory.dtype)
        loss_b = gce(logits_b, batch.y, self.params.q).mean()
        return loss_b, {"loss_biased": loss_b}
