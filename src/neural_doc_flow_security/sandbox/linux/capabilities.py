"""Capabilities: clear the bounding set but for the allowed ones, set the
permitted/effective/inheritable sets, raise the ambient ones (so they survive
exec for a non-root uid). Runs after the uid change, which keeps the permitted
set (keep-caps) so that this stage can still shrink the bounding set."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CAPABILITIES, CapabilityConfig
from . import syscalls as sc

SECBIT_KEEP_CAPS = 1 << 4


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


def apply_capabilities(plan: CapabilityPlan) -> None:
    """Apply the plan to this process (needs CAP_SETPCAP for the bounding set)."""
    if plan.keep_all:
        return
    # The uid change kept the permitted set (keep-caps) but cleared the effective one;
    # CAP_SETPCAP must be effective to shrink the bounding set.
    _, permitted, _ = sc.capget()
    sc.capset(permitted, permitted, 0)
    for cap in range(plan.last_cap + 1):
        if not plan.allowed_mask & (1 << cap):
            sc.prctl(sc.PR_CAPBSET_DROP, cap)
    allowed = plan.allowed_mask & permitted
    if allowed != plan.allowed_mask:
        raise PermissionError(f"capabilities not held by the launcher: {plan.allowed_mask & ~permitted:#x}")
    sc.capset(allowed, allowed, allowed)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in plan.ambient:
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)
