"""Empirical risk minimisation: mean cross-entropy (the base class's loss)."""
from .base import Card, Method


class ERM(Method):
    card = Card("ERM", "baseline", "Vapnik, 1992", order=0, control=True, reference=True)
