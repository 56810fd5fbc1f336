"""Linear forms over the three placement variables: how every time and memory figure reaches the LP.

Placement variables (continuous, what the LP chooses):
  attn_gpu  fraction of layers whose attention weights stay resident on the GPU
  ffn_gpu   fraction of layers whose FFN / expert weights stay resident on the GPU
  kv_gpu    fraction of each batch's sequences whose target KV cache lives on the GPU
"""
from __future__ import annotations

PLACEMENT_VARS = ("attn_gpu", "ffn_gpu", "kv_gpu")
# On a CPU-only machine every weight is "resident" in the one memory and attention runs in place.
CPU_ONLY_PLACEMENT = {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": 0.0}


class Linear:
    """const + attn_gpu·a + ffn_gpu·f + kv_gpu·k: a linear form over the three placement variables.

    Plain floats in slots (not a dict): the planner builds hundreds of thousands of these.
    """

    __slots__ = ("const", "a", "f", "k")

    def __init__(self, const: float = 0.0, a: float = 0.0, f: float = 0.0, k: float = 0.0):
        self.const, self.a, self.f, self.k = const, a, f, k

    @staticmethod
    def of(const: float = 0.0, attn_gpu: float = 0.0, ffn_gpu: float = 0.0, kv_gpu: float = 0.0) -> "Linear":
        return Linear(float(const), float(attn_gpu), float(ffn_gpu), float(kv_gpu))

    @property
    def coef(self) -> tuple[tuple[str, float], ...]:
        return tuple((n, v) for n, v in zip(PLACEMENT_VARS, (self.a, self.f, self.k)) if v)

    def __add__(self, other: "Linear | float") -> "Linear":
        if isinstance(other, Linear):
            return Linear(self.const + other.const, self.a + other.a, self.f + other.f, self.k + other.k)
        return Linear(self.const + other, self.a, self.f, self.k)

    __radd__ = __add__

    def __mul__(self, s: float) -> "Linear":
        return Linear(self.const * s, self.a * s, self.f * s, self.k * s)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Linear) and (self.const, self.a, self.f, self.k) == (
            other.const, other.a, other.f, other.k)

    def __repr__(self) -> str:
        return f"Linear({self.const!r}, attn_gpu={self.a!r}, ffn_gpu={self.f!r}, kv_gpu={self.k!r})"

    def at(self, placement: dict[str, float]) -> float:
        return (self.const + self.a * placement["attn_gpu"] + self.f * placement["ffn_gpu"]
                + self.k * placement["kv_gpu"])

    def minimum(self) -> float:
        """Smallest value over the unit box (a cheap bound)."""
        return self.const + min(self.a, 0.0) + min(self.f, 0.0) + min(self.k, 0.0)


def streamed(total: float, var: str) -> Linear:
    """`total * (1 - var)`: the part of `total` not resident."""
    return Linear.of(total, **{var: -total})
