"""Fair attribute classification through latent-space de-biasing (Ramaswamy, Kim, Russakovsky, CVPR 2021).

A generative model of the training images; in its latent space the hyperplane of the target (label) and of the
protected (spurious) attribute, each a linear classifier fit on the encoded training split (scikit-learn's
logistic regression; the attribute labels of the training split are read here, so `group_labels = "train"`).
For each sampled latent z its complement z' keeps the target score and negates the attribute score; with unit
normals w_t, w_a, offsets b_t, b_a and c = w_t . w_a, the paper's closed form is

    z' = z - 2 (w_a . z + b_a) / (1 - c^2) (w_a - c w_t)

so that w_t . z' = w_t . z and w_a . z' + b_a = -(w_a . z + b_a). Both decoded images carry the target
classifier's label [w_t . z + b_t > 0]; the classifier trains on the real batch plus a synthetic one of
ceil(B n_pairs / n_train) images each step (every pair about once an epoch), so that target and attribute
decorrelate in what it sees.

The generator is a small convolutional VAE, not a GAN as in the paper: on these benchmarks (thousands of small
images) a VAE trains in seconds without adversarial tuning, and its encoder gives each training image a latent
code directly, where a GAN needs an inversion step to place the training split in its latent space before the
hyperplanes can be fit. It works at min(H, 32) pixels (larger images are resized for it and its samples resized
back). Binary label and binary attribute, as in the paper.

The generator stage (VAE, hyperplanes, pairs) depends on the training split and the generator settings only, not
on the training seed: it is cached in DEBIAS_CACHE_DIR/latent_aug/ under a hash of both, so a study's trials reuse
it; its time counts in the trial that trains it (the report's compute column).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.cache import cache_dir, load_verified, save_verified
from .base import Batch, Card, Int, Method, param

STAGE_VERSION = "1"  # bump when the generator stage changes: cached stages are then ignored


def _check_stage(stage, sample_shape) -> None:
    """A generator stage: synthetic inputs shaped like the training samples, a label each, and its statistics."""
    x, y = stage["x"], stage["y"]
    if tuple(x.shape[1:]) != tuple(sample_shape) or y.shape != (len(x),) or not len(x):
        raise ValueError(f"holds synthetic inputs {tuple(x.shape)}, expected (N, {', '.join(map(str, sample_shape))})")
    for k in ("plane_acc_target", "plane_acc_attribute", "planes_cos"):
        float(stage[k])


@dataclass
class LatentAugParams:
    # the upper bounds keep a trial within a worker's memory and time (n_pairs: 2 n_pairs images held at once)
    n_pairs: int = param(2000, "synthetic pairs (z, z'): 2 n_pairs generated images", low=1, high=50_000)
    latent_dim: int = param(16, "the VAE's latent dimension (>= 2: the two latent planes need room)", low=2,
                            high=1024)
    width: int = param(32, "the VAE's channels (its first convolution; the second has twice as many)", low=1,
                       high=1024)
    gen_epochs: int = param(30, "epochs of VAE training", low=1, high=10_000)


def complement(z: torch.Tensor, w_t: torch.Tensor, b_t: float, w_a: torch.Tensor, b_a: float) -> torch.Tensor:
    """z' with the target score kept and the attribute score negated (the paper's closed form; any normals)."""
    n_t, n_a = w_t.norm(), w_a.norm()
    u_t, u_a, s_a = w_t / n_t, w_a / n_a, (z @ w_a + b_a) / n_a
    c = u_t @ u_a
    return z - (2 * s_a / (1 - c * c))[:, None] * (u_a - c * u_t)[None]


class VAE(nn.Module):
    def __init__(self, channels: int, size: int, latent: int, width: int):
        super().__init__()
        self.size, self.down = size, math.ceil(math.ceil(size / 2) / 2)
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(), nn.Flatten())
        self.mu_logvar = nn.Linear(2 * width * self.down ** 2, 2 * latent)
        self.dec_in = nn.Linear(latent, 2 * width * self.down ** 2)
        self.dec = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(width, channels, 4, 2, 1))
        self.width = width

    def encode(self, x):
        return self.mu_logvar(self.enc(x)).chunk(2, dim=1)

    def decode(self, z):
        h = self.dec_in(z).view(len(z), 2 * self.width, self.down, self.down)
        return F.interpolate(self.dec(F.relu(h)), size=(self.size, self.size), mode="bilinear", align_corners=False)


def generator_stage(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, p: LatentAugParams) -> dict:
    """Trains the VAE on x, fits the hyperplanes on the latent means, decodes n_pairs pairs. Deterministic."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    h, w = x.shape[2:]
    size = min(h, w, 32)
    xs = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if (h, w) != (size, size) else x
    vae = VAE(x.shape[1], size, p.latent_dim, p.width)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(p.gen_epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(128):
            mu, logvar = vae.encode(xs[idx])
            z = mu + torch.randn(mu.shape, generator=gen) * (0.5 * logvar).exp()
            recon = F.mse_loss(vae.decode(z), xs[idx], reduction="sum") / len(idx)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            (recon + kl).backward()
            opt.step()
    from sklearn.linear_model import LogisticRegression
    with torch.no_grad():
        mu = torch.cat([vae.encode(xs[i])[0] for i in torch.arange(len(xs)).split(512)])
    planes = []
    for target in (y, a):
        clf = LogisticRegression(max_iter=2000).fit(mu.numpy(), target.numpy())
        planes.append((torch.tensor(clf.coef_[0], dtype=torch.float32), float(clf.intercept_[0]),
                       float(clf.score(mu.numpy(), target.numpy()))))
    (w_t, b_t, acc_t), (w_a, b_a, acc_a) = planes
    z = torch.randn(p.n_pairs, p.latent_dim, generator=gen)
    z2 = complement(z, w_t, b_t, w_a, b_a)
    with torch.no_grad():
        images = torch.cat([vae.decode(z), vae.decode(z2)])
    if (h, w) != (size, size):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    label = (z @ w_t + b_t > 0).long()
    return {"x": images, "y": torch.cat([label, label]), "a_score": torch.cat([z @ w_a + b_a, z2 @ w_a + b_a]),
            "plane_acc_target": acc_t, "plane_acc_attribute": acc_a,
            "planes_cos": float(w_t @ w_a / (w_t.norm() * w_a.norm()))}


class LatentAug(Method):
    Params = LatentAugParams
    SPACE = {"n_pairs": Int(500, 5000), "width": Int(16, 64), "gen_epochs": Int(10, 60)}  # defaults 2000, 32, 30
    group_labels = "train"  # the attribute hyperplane is fit on the training split's attribute labels
    LOGGED = ("generator_seconds", "generator_cached")
    card = Card("Latent de-biasing", "generative augmentation", "Ramaswamy, Kim, Russakovsky, CVPR 2021", order=25)

    def __init__(self, params: LatentAugParams, train, **kw):
        super().__init__(params, train, **kw)
        if self.n_classes != 2 or self.n_groups != 4:
            raise ValueError(f"latent_aug: a binary label and a binary attribute, got {self.n_classes} classes and "
                             f"{self.n_groups} groups")
        self.synthetic: dict | None = None
        self.stage_log: dict = {}
        self._draw = torch.Generator()
        self._resumed_draw: torch.Tensor | None = None

    def setup(self, ctx):
        self.device = ctx.device

    @torch.no_grad()
    def start_epoch(self, epoch, model, train_batches):
        if self.synthetic is not None:
            return
        xs = {}
        for x, _, idx in train_batches(eval=False, inputs=True):  # the training step's inputs, every sample once
            xs.update(zip(idx.tolist(), x.float().cpu()))
        x = torch.stack([xs[i] for i in range(self.n_train)])
        y, g = self.train_labels.cpu(), self.train_group_ids.cpu()
        a = g - 2 * y  # group_labels = "train": the training split's attribute
        key = hashlib.sha256(b"".join([STAGE_VERSION.encode(), x.numpy().tobytes(), y.numpy().tobytes(),
                                       a.numpy().tobytes(), repr(sorted(vars(self.params).items())).encode()]))
        name = f"latent_aug {key.hexdigest()[:32]}"
        path = cache_dir() / "latent_aug" / f"{key.hexdigest()[:32]}.pt"
        t0, stage = time.time(), load_verified(path, name, lambda s: _check_stage(s, x.shape[1:]))
        cached = stage is not None
        if stage is None:
            with torch.enable_grad():
                stage = generator_stage(x, y, a, self.params)
            save_verified(stage, path, name)  # two workers training the same stage write the same file
        self.stage_log = {"generator_seconds": round(time.time() - t0, 2), "generator_cached": cached,
                          "plane_acc_target": stage["plane_acc_target"],
                          "plane_acc_attribute": stage["plane_acc_attribute"], "planes_cos": stage["planes_cos"]}
        self.synthetic = {k: stage[k].to(self.device) for k in ("x", "y")}
        self._draw.manual_seed(int(self.train_labels.sum()) + len(self.train_labels))
        if self._resumed_draw is not None:  # a resumed run: the pairs rebuilt, the draws go on where they were
            self._draw.set_state(self._resumed_draw)
            self._resumed_draw, self.stage_log = None, {}

    def get_extra_state(self):  # the pairs are rebuilt (from the cache) on resume; the draw stream is state
        return {"draw": None if self.synthetic is None else self._draw.get_state()}

    def set_extra_state(self, state):
        self._resumed_draw = state["draw"]

    def extend(self, batch: Batch) -> Batch:
        """The real batch and ceil(B n_syn / N) synthetic images drawn from the pairs (every pair ~once an epoch)."""
        assert self.synthetic is not None, "start_epoch() builds the pairs"
        x, n_syn = batch.x, len(self.synthetic["y"])
        k = max(1, math.ceil(len(batch.y) * n_syn / self.n_train))
        j = torch.randint(n_syn, (k,), generator=self._draw).to(x.device)
        xs = self.synthetic["x"][j].to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            xs = xs.contiguous(memory_format=torch.channels_last)
        return dataclasses.replace(batch, x=torch.cat([x, xs]), y=torch.cat([batch.y, self.synthetic["y"][j]]),
                                   g=None)

    def loss(self, logits, h, batch):
        n = len(batch.idx)  # the real samples come first
        return F.cross_entropy(logits, batch.y), {"nll": F.cross_entropy(logits[:n], batch.y[:n])}

    def epoch_stats(self):
        out, self.stage_log = self.stage_log, {}  # the stage's numbers once, in the epoch that built or loaded it
        return out

    @classmethod
    def describe(cls, stats):
        if "generator_seconds" not in stats:
            return ""
        how = "loaded" if stats["generator_cached"] else "trained"
        return (f"generator {how} in {stats['generator_seconds']:.1f}s, latent planes: target acc "
                f"{stats['plane_acc_target']:.3f} attribute acc {stats['plane_acc_attribute']:.3f}, cos "
                f"{stats['planes_cos']:+.3f}")
