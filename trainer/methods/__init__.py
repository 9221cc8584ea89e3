"""The one method registry: the study layer and the CLI look methods up here by name."""
from .base import Batch, Card, HeldOut, Method, RunContext, TrainSplit
from .dfr import DFR
from .egr import EGR
from .erm import ERM
from .fim import FisherConstrained
from .fim_relative import FisherRelative
from .fisher_penalty import FisherPenalty
from .groupdro import GroupDRO
from .jtt import JTT
from .latent_aug import LatentAug
from .lff import LfF
from .resample import Resample, ResampleClass
from .reweight import Reweight, ReweightClass
from .sam import SAM
from .subsample import Subsample, SubsampleClass

METHODS: dict[str, type[Method]] = {
    "erm": ERM, "groupdro": GroupDRO, "fim": FisherConstrained, "fim_relative": FisherRelative,
    "sam": SAM, "fisher_penalty": FisherPenalty, "egr": EGR, "lff": LfF, "jtt": JTT, "dfr": DFR,
    "latent_aug": LatentAug,
    "resample": Resample, "resample_class": ResampleClass, "reweight": Reweight, "reweight_class": ReweightClass,
    "subsample": Subsample, "subsample_class": SubsampleClass,
}
COMPARISON = ("erm", "groupdro", "fim")  # the paper's table: the control, the group-label baseline, the proposal


LABELS_USED = {"none": "no", "train": "yes", "val": "val split"}  # Method.group_labels, as the tables say it


def _spec(name: str, spec) -> str:
    """One searched parameter as the manual prints it: `eta_q` 0.001–1 log, `scope` {logits, last_layer, full}."""
    if hasattr(spec, "choices"):
        return f"`{name}` {{{', '.join(map(str, spec.choices))}}}"
    log = " log" if getattr(spec, "log", False) else ""
    return f"`{name}` {spec.low:g}–{spec.high:g}{log}"


def methods_table() -> str:
    """The methods table of docs/methods.md, from the registry: name, report label, family, whether it trains on
    group labels, reference, searched parameters (beside lr, weight decay and batch size, which every method
    searches)."""
    rows = ["| name | label | family | trains on group labels | reference | searched |", "|:--|:--|:--|:--|:--|:--|"]
    for name, cls in METHODS.items():
        space = ", ".join(_spec(k, v) for k, v in cls.SPACE.items()) or "—"
        rows.append(f"| `{name}` | {cls.card.label} | {cls.card.family} | {LABELS_USED[cls.group_labels]} | "
                    f"{cls.card.cites} | {space} |")
    return "\n".join(rows) + "\n"


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


__all__ = ["COMPARISON", "LABELS_USED", "METHODS", "Batch", "Card", "HeldOut", "Method", "RunContext", "TrainSplit",
           "get_method", "methods_table"]
