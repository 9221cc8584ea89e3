"""CUDA-only checks (skipped without a GPU): device augmentation, no host sync per step, compiled training."""
import pytest
import torch

from trainer import TrainConfig, fit
from trainer.data import load_splits, make_loader
from trainer.loop import _autocast
from trainer.methods import METHODS, Batch, RunContext, TrainSplit, get_method
from trainer.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_device_augmentation_and_centre_crop(waterbirds_dir):
    s = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24)
    x = next(iter(make_loader(s.train, 8, shuffle=False)))[0]
    on_gpu = s.train.on(CUDA)
    assert on_gpu.x.is_cuda and not s.train.x.is_cuda  # the split itself stays on the host
    xg = x.to(CUDA)
    torch.testing.assert_close(on_gpu.batch_transform(xg, train=False).cpu(), s.train.batch_transform(x, train=False))
    outs = [on_gpu.batch_transform(xg, train=True, generator=torch.Generator(CUDA).manual_seed(0)) for _ in range(2)]
    assert outs[0].shape == (8, 3, 24, 24) and outs[0].is_cuda and torch.equal(*outs)


@pytest.mark.parametrize("method,params", [(name, {}) for name in METHODS] + [("fim", {"scope": "last_layer"})])
def test_training_step_never_waits_for_the_host(waterbirds_dir, method, params):
    s = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24)
    train = s.train.on(CUDA)
    def new_model():
        return build_model("resnet18", 2, pretrained=False).to(CUDA).to(memory_format=torch.channels_last)

    def new_optimizer(parameters):
        return torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)

    model, cls = new_model(), get_method(method)
    m = cls(cls.Params(**params), TrainSplit.view(cls, train.y, train.g, 2, 4)).to(CUDA)
    opt = new_optimizer(model.parameters())
    gen, autocast = torch.Generator(CUDA).manual_seed(0), _autocast(CUDA)
    m.setup(RunContext(new_model, new_optimizer, CUDA, autocast))
    batches = list(make_loader(train, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))

    def calib(eval=False, inputs=False):
        for xb, yb, _, ib in batches:
            if inputs:
                yield train.batch_transform(xb, train=False), yb, ib
                continue
            with torch.no_grad(), autocast():
                logits, h = model(train.batch_transform(xb, train=False), return_features=True)
            yield logits.float(), h.float(), yb, ib

    for epoch in range(cls.first_own_epoch(m.params)):  # through any warm-up (fim calibrates eps)
        m.start_epoch(epoch, model, calib)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside the step raises
    try:
        for xb, yb, ab, idx in batches:
            xb = train.batch_transform(xb, train=True, generator=gen).contiguous(memory_format=torch.channels_last)
            g = yb * 2 + ab if cls.group_labels == "train" else None
            m.training_step(model, opt, Batch(xb, yb, idx, g), autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_bf16_training_runs(waterbirds_dir):
    cfg = TrainConfig(dataset="waterbirds", data_dir=str(waterbirds_dir), method="fim", model="resnet18",
                      pretrained=False, image_size=24, epochs=3, batch_size=4, device="cuda", compile=True,
                      method_params={"scope": "last_layer", "warmup_epochs": 1})
    r = fit(cfg, log=None)
    assert r.compiled and r.epochs_run == 3 and r.history[-1]["constrained"]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r.history)


@pytest.mark.parametrize("method", list(METHODS))
def test_deterministic_runs_reproduce_bit_for_bit(waterbirds_dir, method):
    """--deterministic: no operation of any method is refused by torch's deterministic mode, and a run repeated
    with the same command gives the same losses and the same metrics."""
    params = {"stage1_epochs": 1} if method == "jtt" else {"warmup_epochs": 1} if method == "fim" else {}
    cfg = TrainConfig(dataset="waterbirds", data_dir=str(waterbirds_dir), method=method, model="resnet18",
                      pretrained=False, image_size=24, epochs=2, batch_size=4, device="cuda", augment=True,
                      deterministic=True, patience=0, method_params=params)
    a, b = (fit(cfg, log=None) for _ in range(2))
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.test == b.test and a.val == b.val
