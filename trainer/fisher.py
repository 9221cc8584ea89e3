"""Per-sample traces of the Fisher information, T_i = ||grad_theta log p(y | x_i; theta)||^2.

Which Fisher. The *empirical* Fisher takes y = y_i, the sample's label: T_i = ||grad_theta l_i||^2 for the
cross-entropy l_i. The *expected* (true) Fisher averages over the model's own predictive distribution:
T_i = sum_c p_c(x_i) ||grad_theta log p(c | x_i)||^2. They differ where it matters here: a confidently wrong sample
(a bias-conflicting one once the shortcut is learnt) has a large empirical trace and a small expected one, since
the expected trace ignores the label. Both are offered (`fisher`); the empirical one is the default.

Scopes:
- `logits`: the gradient with respect to the logits z. dl/dz = p - e_y, so T_i = ||p_i - e_{y_i}||^2 (expected:
  1 - ||p_i||^2). A function of the sample's loss alone: a proxy, not the paper's quantity.
- `last_layer`: the last linear layer (W, b) on features h: dl/dW = (p - e_y) h^T, dl/db = p - e_y, so
  T_i = ||p_i - e_{y_i}||^2 (||h_i||^2 + 1), exact and differentiable by plain autograd.
- `full`: every trainable parameter of the network (the paper's per-sample Fisher trace), `ParameterTrace`.

BatchNorm in the full scope. A training step normalises each batch with its own statistics, which couples the
samples: the gradient of l_i then has terms through every other sample's activations, and "the sample's gradient"
is not defined. Here the statistics are those of the training step's batch (the same mean and biased variance,
so the same logits), treated as constants: T_i is the squared norm of the gradient along sample i's own path
through the network as the training step normalised it. BatchNorm layers in eval mode (frozen BN) use their running
statistics, as the training step does. The penalty's gradient treats the statistics the same way.

How the full trace is computed (the ghost-norm identities). With the statistics held fixed the samples are
independent, so one backward of sum_i l_i gives each layer's output gradient delta_i of every sample. A linear
layer's per-sample weight gradient is delta_i a_i^T, so ||.||^2 = ||delta_i||^2 ||a_i||^2; a convolution's is
sum_s delta_{i,s} a_{i,s}^T over output positions s (a = the unfolded input), whose squared norm is taken from the
per-sample [C_out, C_in k^2] gradients (one convolution with the batch as groups) or, when the positions are
fewer, from the Gram identity
sum_{s,s'} (delta_s . delta_s')(a_s . a_s'); BatchNorm's affine gradients are sums over positions of delta x_hat
and delta. One backward gives T_i for the whole batch without materialising per-sample gradients of the whole
network, and it runs on the training step's own forward (`recording`): each train-mode BatchNorm's output there is
y_frozen + gate(y_train - y_frozen), equal in value to y_train; the gate passes gradients in the step's backward
(the exact train-mode gradient) and blocks them in the trace's (the statistics held constant), so the step pays
one extra backward for every sample's trace, not a forward and a backward. The same expressions built with
`create_graph=True` are differentiable: backpropagating sum_{i in K} lambda_i T_i through them is the exact double
backprop of the penalty (Hessian-vector products H_i g_i), run on the active samples K only.
"""
from __future__ import annotations

import contextlib
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight
from torch.nn.modules.batchnorm import _BatchNorm

SCOPES = ("logits", "last_layer", "full")
FISHERS = ("empirical", "expected")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 activations -> fp32, fp64 stays fp64


def logit_trace(logits: torch.Tensor, y: torch.Tensor, fisher: str = "empirical") -> torch.Tensor:
    p = at_least_fp32(logits).softmax(1)
    if fisher == "expected":  # sum_c p_c ||p - e_c||^2 = 1 - ||p||^2
        return 1.0 - p.pow(2).sum(1)
    return (p - F.one_hot(y, logits.shape[1]).to(p.dtype)).pow(2).sum(1)


def last_layer_trace(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor, fisher: str = "empirical"):
    return logit_trace(logits, y, fisher) * (at_least_fp32(h).pow(2).sum(1) + 1.0)


def _trainable(m: nn.Module, name: str) -> bool:
    p = getattr(m, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


class _Gate(torch.autograd.Function):
    """Identity; its backward passes the gradient only while `passing` (see `ParameterTrace.recording`)."""
    passing = True

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g if _Gate.passing else None


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A train-mode BatchNorm's batch mean and biased variance of its input, per channel."""
    x = at_least_fp32(x.detach())
    dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims)  # two plain reductions: 8x faster than Tensor.var on the CPU, as exact
    return mean, (x - mean.view(shape)).pow(2).mean(dims)


class ParameterTrace:
    """Per-sample Fisher traces over every trainable parameter of `model` (the module docstring says how)."""

    def __init__(self, model: nn.Module):
        self.model = getattr(model, "_orig_mod", model)  # hooks on a torch.compile'd model may not fire: the eager one
        self.layers: list[nn.Module] = []
        for name, m in self.model.named_modules():
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            conv_ok = isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str)
            if not (conv_ok or isinstance(m, (nn.Linear, _BatchNorm))):
                raise ValueError(f"scope full: no per-sample gradient rule for layer {name!r} ({m})")
            self.layers.append(m)
        self.norms = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]

    @contextlib.contextmanager
    def batch_statistics(self):
        """Records, during a forward of the training step, each train-mode BatchNorm's batch mean and biased
        variance (the ones it normalises with)."""
        stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(m, args):
            if m.training:
                stats[m] = _moments(args[0])
        handles = [m.register_forward_pre_hook(hook) for m in self.norms]
        try:
            yield stats
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _frozen(self, stats):
        """BatchNorm layers normalise with `stats` as constants (eval mode with those as running statistics)."""
        saved = [(m, m.training, m.running_mean, m.running_var) for m in stats]
        try:
            for m, (mean, var) in stats.items():
                m.training, m.running_mean, m.running_var = False, mean, var
            yield
        finally:
            for m, training, mean, var in saved:
                m.training, m.running_mean, m.running_var = training, mean, var

    @contextlib.contextmanager
    def recording(self):
        """Around the training step's forward: yields (stats, saved) for `recorded_traces` (and stats for `traces`).
        Train-mode BatchNorm outputs become y_frozen + gate(y_train - y_frozen) (the module docstring says why)."""
        stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        saved: dict[nn.Module, tuple] = {}
        trainable = set(self.layers)

        def pre(m, args):
            if m.training:
                stats[m] = _moments(args[0])

        def post(m, args, out):
            moments = None
            if isinstance(m, _BatchNorm):
                moments = stats[m] if m.training else (m.running_mean, m.running_var)
                if m.training:
                    frozen = F.batch_norm(args[0], *moments, m.weight, m.bias, False, 0.0, m.eps)
                    out = frozen + _Gate.apply(out - frozen)
            if m in trainable:
                saved[m] = (args[0], args[0]._version, out, moments, out._version)
            # in-place ops downstream (ReLU after BatchNorm, residual +=) must not overwrite a kept output: a
            # BatchNorm's is cloned; any other is kept as is and `_check` refuses it if something wrote into it
            return out.clone() if moments is not None else None
        handles = [m.register_forward_pre_hook(pre) for m in self.norms]
        handles += [m.register_forward_hook(post) for m in dict.fromkeys(self.layers + self.norms)]
        try:
            yield stats, saved
        finally:
            for h in handles:
                h.remove()

    def recorded_traces(self, logits: torch.Tensor, y: torch.Tensor, saved: dict, fisher: str = "empirical",
                        retain_graph: bool = False) -> torch.Tensor:
        """T_i of every sample from the recorded forward that gave `logits` (not differentiable); with retain_graph
        the step's own backward can still run on it after this."""
        self._check(saved)
        _Gate.passing = False
        try:
            return self._from_outputs(logits, y, saved, fisher, False, retain_graph)
        finally:
            _Gate.passing = True

    def _check(self, saved):
        if any(saved[m][0]._version != saved[m][1] for m in self.layers):
            raise RuntimeError("scope full: a layer's input was modified in place after the layer read it")
        if any(saved[m][2]._version != saved[m][4] for m in self.layers):
            raise RuntimeError("scope full: a layer's output was modified in place after the layer wrote it")

    def batch_traces(self, x: torch.Tensor, y: torch.Tensor, fisher: str = "empirical",
                     create_graph: bool = False) -> torch.Tensor:
        """T_i of the batch with the statistics a training step on it would take: a forward records them, then
        `traces` (a calibration pass, or any caller without the step's statistics at hand)."""
        with self.batch_statistics() as stats, torch.no_grad():
            self.model(x)
        return self.traces(x, y, stats, fisher, create_graph)

    def traces(self, x: torch.Tensor, y: torch.Tensor, stats: dict, fisher: str = "empirical",
               create_graph: bool = False) -> torch.Tensor:
        """T_i for every sample of the batch (x, y), BatchNorm normalising with `stats` (from batch_statistics;
        {} for a model without train-mode BatchNorm). create_graph=True: differentiable in the parameters."""
        saved: dict[nn.Module, tuple] = {}

        def keep(m, args, out):
            frozen = (m.running_mean, m.running_var) if isinstance(m, _BatchNorm) else None
            saved[m] = (args[0], args[0]._version, out, frozen, out._version)
            return out.clone()  # in-place ops downstream (ReLU, residual +=) must not overwrite the kept output
        handles = [m.register_forward_hook(keep) for m in self.layers]
        try:
            with torch.enable_grad(), self._frozen(stats):
                logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        self._check(saved)
        with torch.enable_grad():  # a caller under no_grad (a calibration pass) still needs the output gradients
            return self._from_outputs(logits, y, saved, fisher, create_graph)

    def _from_outputs(self, logits, y, saved, fisher, create_graph, retain_graph=False):
        logp = F.log_softmax(at_least_fp32(logits), 1)
        if fisher == "empirical":
            targets = [(y, None)]
        else:  # the model's own distribution: sum_c p_c ||grad log p_c||^2
            targets = [(torch.full_like(y, c), logp[:, c].exp()) for c in range(logits.shape[1])]
        outputs = [saved[m][2] for m in self.layers]
        total = logp.new_zeros(len(y))
        for k, (target, weight) in enumerate(targets):
            nll = -logp.gather(1, target[:, None]).sum()  # samples independent: each output's gradient is its own
            deltas = torch.autograd.grad(nll, outputs, create_graph=create_graph,
                                         retain_graph=create_graph or retain_graph or k + 1 < len(targets))
            with torch.set_grad_enabled(create_graph):
                t = sum(self._sq_norm(m, saved[m][0], d, saved[m][3]) for m, d in zip(self.layers, deltas))
                total = total + (t if weight is None else weight * t)
        return total if create_graph else total.detach()

    @staticmethod
    def _sq_norm(m: nn.Module, a: torch.Tensor, d: torch.Tensor, frozen) -> torch.Tensor:
        """||d l_i / d (this layer's own parameters)||^2 per sample from its input a and output gradient d."""
        a, d = at_least_fp32(a), at_least_fp32(d)
        b = d.shape[0]
        if isinstance(m, _BatchNorm):
            mean, var = frozen
            shape = (1, -1) + (1,) * (a.dim() - 2)
            xhat = (a - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps)
            d3 = d.reshape(b, d.shape[1], -1)
            t = d3.new_zeros(b)
            if _trainable(m, "weight"):
                t = t + (d3 * xhat.reshape(d3.shape)).sum(2).pow(2).sum(1)
            if _trainable(m, "bias"):
                t = t + d3.sum(2).pow(2).sum(1)
            return t
        conv = isinstance(m, nn.Conv2d)
        layer = cast(nn.Conv2d, m)  # read for its convolution geometry only when conv
        # Linear on [B, in] or [B, ..., in]: the middle dimensions are positions
        d3 = d.flatten(2) if conv else d.reshape(b, -1, d.shape[-1]).transpose(1, 2)  # [B, C_out, S]

        def columns():  # the layer's input at each output position, [B, C_in k^2 (Linear: in), S]
            if conv:
                return F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            return a.reshape(b, -1, a.shape[-1]).transpose(1, 2)
        t = d3.new_zeros(b)
        if _trainable(m, "weight"):
            s = d3.shape[2]
            if s == 1:
                t = t + d3.pow(2).sum((1, 2)) * columns().pow(2).sum((1, 2))
            elif d3.shape[1] * layer.weight[0].numel() <= s * s:  # the per-sample gradients are the smaller object
                if conv:  # all of them from one convolution with the batch as groups (2x faster than unfold + bmm)
                    c_in = a.shape[1]
                    g = conv2d_weight(a.reshape(1, b * c_in, *a.shape[2:]), (b * d.shape[1], c_in, *layer.kernel_size),
                                      d.reshape(1, b * d.shape[1], *d.shape[2:]), layer.stride, layer.padding,
                                      layer.dilation, groups=b)
                else:
                    g = torch.bmm(d3, columns().transpose(1, 2))
                t = t + g.reshape(b, -1).pow(2).sum(1)
            else:  # the Gram identity over positions
                cols = columns()
                t = t + (torch.bmm(d3.transpose(1, 2), d3) * torch.bmm(cols.transpose(1, 2), cols)).sum((1, 2))
        if _trainable(m, "bias"):
            t = t + d3.sum(2).pow(2).sum(1)
        return t
