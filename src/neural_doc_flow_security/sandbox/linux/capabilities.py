"""Capabilities: the masks the child applies (the CAPABILITIES step of
_child.c): clear the bounding set but for the allowed ones, set the
permitted/effective/inheritable sets, raise the ambient ones (so they survive
exec for a non-root uid)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CAPABILITIES, CapabilityConfig


def last_capability() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


@dataclass(frozen=True)
class CapabilityPlan:
    """Bit masks decided in the parent. `keep_all` leaves every capability alone."""

    keep_all: bool
    allowed_mask: int
    ambient: tuple[int, ...]
    last_cap: int
    names: tuple[str, ...]


def plan_capabilities(config: CapabilityConfig) -> CapabilityPlan:
    """Turn the capability config into masks."""
    mask = 0
    for name in config.allowed:
        mask |= 1 << CAPABILITIES[name]
    return CapabilityPlan(
        keep_all=not config.drop_all,
        allowed_mask=mask,
        ambient=tuple(CAPABILITIES[name] for name in config.ambient),
        last_cap=last_capability(),
        names=config.allowed if config.drop_all else ("ALL",),
    )
