"""Time per training step of every registered method (fim in each trace scope), as ratios to ERM, in one run.

    python bench/step_cost.py [--device auto] [--steps 50] [--rounds 3] [--batch B] [--image-size PX]
                              [--n-train 4795] [--compile] [--deterministic] [--only LABELS]

--compile adds a row: ERM with torch.compile (its compile time is printed, not counted in the step).
--deterministic adds rows: ERM, GroupDRO and fim under the trainer's --deterministic mode (its cost).

CUDA: ResNet-50, batch 128, 224 px, bf16 autocast, channels_last. CPU: the small CNN, batch 64, 28 px.
The batch is already on the device (this measures the step, not the data path: see bench/epoch_cost.py).
Each method is timed in its own phase (fim with eps calibrated, after its warm-up), where it does its extra work
(fim's full scope: the step, every sample's trace, the double backprop on the active set; ρ = 0.1 by default);
LfF's step includes its biased model's. Methods are timed in
interleaved rounds so that clock or thermal drift affects every method alike.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from trainer.loop import _autocast, deterministic_mode, resolve_device
from trainer.methods import METHODS, Batch, RunContext, TrainSplit, get_method
from trainer.models import build_model

# latent_aug: one epoch of its generator (its stage, built once per run, is not the step; n_pairs sets the step's cost)
RUNS = [(name, name, {"gen_epochs": 1} if name == "latent_aug" else {}) for name in METHODS] + [
    ("fim (last_layer)", "fim", {"scope": "last_layer"}), ("fim (full)", "fim", {"scope": "full"}),
    ("fim (full, global K)", "fim", {"scope": "full", "active_set": "global"}),
    ("fim (full, expected Fisher)", "fim", {"scope": "full", "fisher": "expected"}),
    ("fim_relative (full)", "fim_relative", {"scope": "full"}),
    ("fisher_penalty (every_k 10)", "fisher_penalty", {"every_k": 10})]


def setup(method: str, params: dict, device, model_name: str, batch: int, size: int, n_train: int, compile_: bool):
    torch.manual_seed(0)
    cuda = device.type == "cuda"

    def new_model():
        m = build_model(model_name, 2, pretrained=False).to(device)
        return m.to(memory_format=torch.channels_last) if cuda else m

    def new_optimizer(parameters):
        return torch.optim.SGD(parameters, lr=1e-3, momentum=0.9, weight_decay=1e-4)

    model = new_model()
    net = torch.compile(model) if compile_ else model
    groups = torch.arange(n_train) % 4
    cls = get_method(method)
    m = cls(cls.Params(**params), TrainSplit.view(cls, groups // 2, groups, 2, 4)).to(device)
    opt = new_optimizer(model.parameters())
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    idx = torch.randperm(n_train, device=device)[:batch]
    g = y * 2 + torch.randint(0, 2, (batch,), device=device) if cls.group_labels == "train" else None
    autocast = _autocast(device)
    m.setup(RunContext(new_model, new_optimizer, device, autocast))

    def batches(eval=False, inputs=False):
        if inputs:  # a method's own passes over the training set (the full scope's calibration, latent_aug's VAE)
            draw = torch.Generator(device=device).manual_seed(1)
            for chunk in torch.arange(n_train, device=device).split(batch):
                xs = torch.randn(len(chunk), *x.shape[1:], device=device, generator=draw)
                yield xs, groups.to(device)[chunk] // 2, chunk
            return
        with torch.no_grad(), autocast():
            logits, h = net(x, return_features=True)
        yield logits.float(), h.float(), y, idx

    for epoch in range(cls.first_own_epoch(m.params)):  # through any warm-up: fim calibrates eps here
        m.start_epoch(epoch, net, batches)
    net.train()

    def step():
        return m.training_step(net, opt, Batch(x, y, idx, g), autocast)["loss"]
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=50, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 128 on CUDA, 64 on the CPU)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: 224 on CUDA, 28 on the CPU)")
    p.add_argument("--n-train", type=int, default=4795, help="training-set size the methods' per-sample state has "
                   "(Waterbirds': 4795)")
    p.add_argument("--compile", action="store_true", help="add ERM with torch.compile (compile time excluded)")
    p.add_argument("--deterministic", action="store_true", help="add ERM, GroupDRO, fim in deterministic mode")
    p.add_argument("--only", help="';'-separated row labels to time (ERM is always timed), e.g. 'fim;fim (full)'")
    args = p.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    model, batch, size = ("resnet50", 128, 224) if cuda else ("cnn", 64, 28)
    batch, size = args.batch or batch, args.image_size or size
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    steps = {}
    only = None if args.only is None else {"erm", *args.only.split(";")}
    runs = [(*r, False, False) for r in RUNS if only is None or r[0] in only] + (
        [("erm + torch.compile", "erm", {}, True, False)]
                                                  if args.compile else [])
    if args.deterministic:
        runs += [(f"{m} --deterministic", m, {}, False, True) for m in ("erm", "groupdro", "fim")]
    modes = {}
    for label, method, params, compile_, det in runs:
        t0 = time.time()
        modes[label] = det
        with deterministic_mode(det):
            steps[label] = setup(method, params, device, model, batch, size, args.n_train, compile_)
            for _ in range(5):  # warm-up (and compilation)
                steps[label]()
        sync(device)
        print(f"{label}: ready in {time.time() - t0:.1f}s", flush=True)
    times = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, step in steps.items():
            sync(device)
            with deterministic_mode(modes[label]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    loss = step()
                sync(device)
            assert torch.isfinite(loss)
            times[label].append((time.perf_counter() - t0) / args.steps)
    # the fastest round of each: noise from other processes only ever adds time (medians moved ±10% run to run
    # on the shared 2-core machine)
    erm = min(times["erm"])
    rows = [{"method": label, "ms/step": round(1000 * min(t), 2),
             "img/s": round(batch / min(t)), "ratio to ERM": round(min(t) / erm, 3)}
            for label, t in times.items()]
    print(f"\n{name}: {model}, batch {batch}, {size} px{', bf16 autocast, channels_last' if cuda else ''}"
          f"; fastest of {args.rounds} interleaved rounds x {args.steps} steps\n")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
