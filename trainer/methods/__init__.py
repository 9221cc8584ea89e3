"""The one method registry: the study layer and the CLI look methods up here by name."""
from .base import Method, RunContext
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


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


__all__ = ["COMPARISON", "METHODS", "Method", "RunContext", "get_method"]
