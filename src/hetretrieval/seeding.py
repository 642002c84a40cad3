"""The one way to derive a seed from several integers (run seed, epoch, batch, image index...)."""

from __future__ import annotations

_PRIME = 1_000_003
_MODULUS = 2**63  # torch.Generator.manual_seed takes a 64-bit seed


def mix_seed(*parts: int) -> int:
    """A seed determined by `parts`, in order: `((p0 * P + p1) * P + p2) ...` modulo 2^63, `P = 1_000_003`.

    Two parts give `p0 * 1_000_003 + p1`, so distinct (run seed, draw) pairs below a million never collide.
    """
    value = 0
    for part in parts:
        value = (value * _PRIME + int(part)) % _MODULUS
    return value
