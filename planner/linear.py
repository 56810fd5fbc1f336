"""Linear forms over the placement variables: how every time and memory figure reaches the LP.

Placement variables (continuous, what the LP chooses):
  attn_gpu  fraction of layers whose attention weights stay resident on the GPU
  ffn_gpu   fraction of layers whose FFN / expert weights stay resident on the GPU
  kv_gpu    fraction of each batch's sequences whose target KV cache lives on the GPU
  disk      fraction of layers whose weights (attention and FFN) are not held in host memory but read
            from the checkpoint on disk every sweep (the disk tier; 0 unless host memory is short)
"""
from __future__ import annotations

PLACEMENT_VARS = ("attn_gpu", "ffn_gpu", "kv_gpu", "disk")
# On a CPU-only machine every weight is "resident" in the one memory and attention runs in place.
CPU_ONLY_PLACEMENT = {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": 0.0, "disk": 0.0}


class Linear:
    """const + attn_gpu·attn + ffn_gpu·ffn + kv_gpu·kv + disk·disk: a linear form over the placement variables.

    The coefficients are named after the placement variable they multiply (`kv` is the coefficient
    on kv_gpu, nothing to do with the draft length k). Plain floats in slots (not a dict): the planner
    builds hundreds of thousands of these.
    """

    __slots__ = ("const", "attn", "ffn", "kv", "disk")

    def __init__(self, const: float = 0.0, attn: float = 0.0, ffn: float = 0.0, kv: float = 0.0, disk: float = 0.0):
        self.const, self.attn, self.ffn, self.kv, self.disk = const, attn, ffn, kv, disk

    @staticmethod
    def of(const: float = 0.0, attn_gpu: float = 0.0, ffn_gpu: float = 0.0, kv_gpu: float = 0.0,
           disk: float = 0.0) -> "Linear":
        return Linear(float(const), float(attn_gpu), float(ffn_gpu), float(kv_gpu), float(disk))

    @property
    def coef(self) -> tuple[tuple[str, float], ...]:
        return tuple((n, v) for n, v in zip(PLACEMENT_VARS, (self.attn, self.ffn, self.kv, self.disk)) if v)

    def __add__(self, other: "Linear | float") -> "Linear":
        if isinstance(other, Linear):
            return Linear(self.const + other.const, self.attn + other.attn, self.ffn + other.ffn, self.kv + other.kv,
                          self.disk + other.disk)
        return Linear(self.const + other, self.attn, self.ffn, self.kv, self.disk)

    __radd__ = __add__

    def __mul__(self, s: float) -> "Linear":
        return Linear(self.const * s, self.attn * s, self.ffn * s, self.kv * s, self.disk * s)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Linear) and (self.const, self.attn, self.ffn, self.kv, self.disk) == (
            other.const, other.attn, other.ffn, other.kv, other.disk)

    def __repr__(self) -> str:
        return (f"Linear({self.const!r}, attn_gpu={self.attn!r}, ffn_gpu={self.ffn!r}, kv_gpu={self.kv!r}"
                + (f", disk={self.disk!r})" if self.disk else ")"))

    def at(self, placement: dict[str, float]) -> float:
        return (self.const + self.attn * placement["attn_gpu"] + self.ffn * placement["ffn_gpu"]
                + self.kv * placement["kv_gpu"] + (self.disk * placement.get("disk", 0.0) if self.disk else 0.0))

    def without_disk(self) -> "Linear":
        return Linear(self.const, self.attn, self.ffn, self.kv)

    def minimum(self) -> float:
        """Smallest value over the unit box (a cheap bound)."""
        return self.const + min(self.attn, 0.0) + min(self.ffn, 0.0) + min(self.kv, 0.0) + min(self.disk, 0.0)


def streamed(total: float, var: str) -> Linear:
    """`total * (1 - var)`: the part of `total` not resident."""
    return Linear.of(total, **{var: -total})
