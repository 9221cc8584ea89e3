"""The one method registry: the study layer and the CLI look methods up here by name."""
from .base import Method
from .erm import ERM
from .fim import FisherConstrained
from .groupdro import GroupDRO

METHODS: dict[str, type[Method]] = {"erm": ERM, "groupdro": GroupDRO, "fim": FisherConstrained}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
