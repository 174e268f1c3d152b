"""The Launcher: owns the sandboxes started by this (single-threaded) process.

It is transport-agnostic: the zygote drives it from a selectors loop, the
`fork` start method from the manager's asyncio loop, and `ndf-sandbox run`
from a blocking poll. It starts sandboxes, enforces wall deadlines, reaps them
into results, freezes, thaws, signals and kills them, and reads live stats.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..config import SandboxConfig
from ..errors import SandboxError, SetupError, UnsupportedError
from ..linux import cgroups, ids, landlock, network
from ..linux.cgroups.base import CgroupLimits, SandboxCgroup
from ..linux.rootfs import RootfsPlan
from ..result import Outcome, ResourceUsage, SandboxResult
from . import bootstrap, resources
from . import spare as spare_sandbox
from .plan import LaunchPlan, plan_launch
from .spare import Spare
from .spawn import SpawnedSandbox, finish_sandbox, reported_result, spawn_sandbox, usage_from_cgroup
from .template import Template, TemplateGone

if TYPE_CHECKING:
    from ..linux.connect_proxy import ConnectProxy
    from ..linux.netpolicy import NetworkLease
    from ..live_limits import LimitUpdate

MAX_SPARE_FAILURES = 3  # then no more spares: something on this host refuses them (logged)
MAX_SPARES = 2  # one for each root of the latest launches (a callable's and a program's differ)


@dataclass(frozen=True)
class LaunchRequest:
    """One sandbox to start: its config, payload, a label, its fds (target <- source)."""

    config: SandboxConfig
    payload: bootstrap.Payload
    name: str = "sandbox"
    fd_map: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2))
    armed: bool = True  # False: no wall clock until arm() (pooled sandboxes)
    # Without limits a cgroup only accounts (tree memory peak, processes, I/O, live
    # stats, freezing); without one, init's report of the payload's end does (rusage:
    # CPU, the largest process's peak). "always": a spawned plugin (live status,
    # pause). "when idle": a call, answered the moment it replies by reading its
    # cgroup, made only while no other sandbox of this launcher runs (a spare has one
    # anyway): under load a v1 cgroup costs ~1.5 ms of CPU per sandbox. "never": a
    # program waited for until it exits. With the pid namespace off a cgroup is always
    # made: only it contains the tree.
    accounting_cgroup: Literal["always", "when idle", "never"] = "always"


def effective_config(request: LaunchRequest) -> SandboxConfig:
    """A Python payload needs the interpreter visible inside the sandbox."""
    config = request.config
    if request.payload.needs_python and not config.filesystem.python:
        config = dataclasses.replace(config, filesystem=dataclasses.replace(config.filesystem, python=True))
    return config


def _with_resolver(plan: LaunchPlan, policy: NetworkLease) -> LaunchPlan:
    """The plan with the sandbox's /etc/resolv.conf naming its resolver."""
    if plan.rootfs is None:
        return plan
    files = tuple(f for f in plan.rootfs.files if f[0] != "/etc/resolv.conf")
    rootfs = dataclasses.replace(plan.rootfs, files=(*files, ("/etc/resolv.conf", policy.resolv_conf)))
    ruleset = plan.landlock
    if ruleset is not None:  # the file is readable like the root's other files
        rule = ("/etc/resolv.conf", landlock.READ_FILE & ruleset.handled_fs)
        ruleset = dataclasses.replace(ruleset, rules=(*ruleset.rules, rule))
    return dataclasses.replace(plan, rootfs=rootfs, landlock=ruleset)


def _with_network_events(spawned: SpawnedSandbox, result: SandboxResult) -> SandboxResult:
    """The result with the denied connections its network policy counted."""
    if spawned.network is None:
        return result
    try:
        events = spawned.network.denied()
    except (SandboxError, OSError) as e:
        _log().error("cannot read the denied connections of a sandbox: %s", e)
        # The result says so too: its security_events lack what the policy counted.
        isolation = dataclasses.replace(result.isolation,
                                        not_enforced=(*result.isolation.not_enforced, f"network: {e}"))
        return dataclasses.replace(result, isolation=isolation)
    return dataclasses.replace(result, security_events=result.security_events + events) if events else result


def _log() -> Any:
    import logging

    return logging.getLogger(__name__)


def _restore_limits(cgroup: SandboxCgroup, limits: CgroupLimits) -> None:
    """Write `limits` back after a failed update (best effort: it is logged)."""
    try:
        cgroup.update(limits)
    except (SandboxError, OSError) as e:
        _log().error("cannot restore the limits of a cgroup after a failed update: %s", e)


class Launcher:
    """Sandboxes started by this process, by id."""

    def __init__(self, *, netns_ahead: bool = False, spares: bool = False, template: Template | None = None) -> None:
        self.template = template  # clones every sandbox (a zygote's); else this process does
        self.template_lost = ""  # why the template is gone: then nothing more is started
        self.netns_ahead = netns_ahead  # make each next network namespace ahead (a zygote: never the host)
        self.spares = spares and os.geteuid() == 0  # keep spare sandboxes made ahead (launch/spare.py)
        self._spares: list[Spare] = []
        # The roots the spares build: those of the latest launches, newest first, each once.
        self._spare_roots: list[RootfsPlan | None] = [None]
        self._spare_failures = 0
        self._retired: list[SandboxCgroup] = []
        self.running: dict[int, SpawnedSandbox] = {}
        self._paused_by_signal: dict[int, list[int]] = {}

    def start(self, sandbox_id: int, request: LaunchRequest) -> SpawnedSandbox:
        """Create the cgroup and spawn. Raises SandboxError subclasses: a protection
        the host cannot provide is an UnsupportedError that names it; TemplateGone:
        nothing was started, and this launcher starts nothing more."""
        if self.template_lost:
            raise TemplateGone(self.template_lost)
        config = effective_config(request)
        plan = plan_launch(config)
        self._expect_plan(plan)
        accounting = request.accounting_cgroup == "always" or (request.accounting_cgroup == "when idle"
                                                               and not self._working())

        def make_cgroup() -> SandboxCgroup | None:
            if not (accounting or plan.cgroup_limits_requested or "pid" not in plan.namespaces.names):
                return None
            made = resources.create_cgroup(config, request.name, plan)
            if made is None and "pid" not in plan.namespaces.names:
                raise UnsupportedError("namespaces.pid", "without a pid namespace only a cgroup can contain the "
                                       "process tree (orphans, the timeout), and no cgroup can be created here")
            return made

        lease = ids.acquire(config.id_range) if plan.needs_ids else None
        try:
            # A network policy needs a namespace of its own with its link: no spare has one.
            spawned = self._launch_spare(request, config, plan, lease) if config.network is None else None
            if spawned is None:
                spawned = self._launch_cold(request, config, plan, lease, make_cgroup)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        return self._started(sandbox_id, request, spawned)

    def expect(self, request: LaunchRequest) -> None:
        """Make the spare(s) build only the root of launches like `request` (a fresh
        launcher that knows what its launches will be)."""
        self._spare_roots = [spare_sandbox.root_to_build_ahead(plan_launch(effective_config(request)))]

    def _expect_plan(self, plan: LaunchPlan) -> None:
        root = spare_sandbox.root_to_build_ahead(plan)
        self._spare_roots = [root, *(r for r in self._spare_roots if r != root)][:MAX_SPARES]

    def _launch_cold(self, request: LaunchRequest, config: SandboxConfig, plan: LaunchPlan,
                     lease: ids.IdLease | None, make_cgroup: Callable[[], SandboxCgroup | None]) -> SpawnedSandbox:
        """Clone a new child (no spare fits)."""
        # On cgroup v1 the cgroup is made after the clone, while the child sets up.
        early = cgroups.joined_at_clone()
        cgroup = make_cgroup() if early else None
        policy: NetworkLease | None = None
        proxy: ConnectProxy | None = None
        try:
            if plan.network_method == "proxy" and config.network is not None:
                from ..linux import connect_proxy  # only here: a run without a policy imports none of it

                proxy = connect_proxy.start(config.network)  # it starts up while the sandbox does
            if plan.network_method == "veth" and config.network is not None:
                from ..linux import netpolicy

                policy = netpolicy.setup(config.network)
                netns_fd: int | None = os.dup(policy.netns_fd)
                plan = _with_resolver(plan, policy) if config.network.dns else plan
            else:
                netns_fd = network.take() if network.can_prepare(plan.namespaces.names) else None  # made ahead?
            if self.template is None:
                network.settle()  # a spare still in the making: no thread may run while we clone
            try:
                spawned = spawn_sandbox(plan, request.payload, cgroup=cgroup, fd_map=request.fd_map,
                                        make_cgroup=None if early else make_cgroup, netns_fd=netns_fd,
                                        template=self.template, ids=lease)
            except TemplateGone as e:
                self.template_gone(str(e))
                raise TemplateGone(self.template_lost) from None
        except BaseException as e:
            for held in (policy, proxy):
                if held is not None:
                    held.release()
            if cgroup is not None:
                try:
                    cgroup.destroy()
                except (SandboxError, OSError) as cleanup:
                    _log().error("cannot remove the cgroup of a failed launch: %s", cleanup)
            if isinstance(e, SetupError):
                raise resources.explain_setup_failure(config, e) from None
            raise
        if proxy is not None:
            # The listening socket the child made in its network namespace (none: it failed
            # a stage before, which its result tells; then the sandbox reaches nothing).
            proxy.hand_over(spawned.proxy_read)
            os.close(spawned.proxy_read)
            spawned.proxy_read = -1
            spawned.network = proxy
        if policy is not None:
            spawned.network = policy
            if policy.notes:  # what this host leaves open of the policy
                isolation = spawned.isolation()
                spawned._isolation = dataclasses.replace(isolation,
                                                         not_enforced=isolation.not_enforced + policy.notes)
        return spawned

    def _started(self, sandbox_id: int, request: LaunchRequest, spawned: SpawnedSandbox) -> SpawnedSandbox:
        spawned.armed = request.armed
        self.running[sandbox_id] = spawned
        return spawned

    def _launch_spare(self, request: LaunchRequest, config: SandboxConfig, plan: LaunchPlan,
                      lease: ids.IdLease | None) -> SpawnedSandbox | None:
        """Start the sandbox from a spare made ahead, if one fits; None: take the
        cold path (a spare that does not fit stays for later)."""
        fitting = [s for s in self._spares if spare_sandbox.matches(s, plan, request.fd_map)]
        spare = min(fitting, key=lambda s: s.rootfs is None, default=None)  # one that built the root first
        if spare is None:
            return None
        if spare.cgroup is None and (request.accounting_cgroup == "always" or plan.cgroup_limits_requested):
            return None
        self._spares.remove(spare)
        if not spare_sandbox.alive(spare):
            self._spare_failures += 1
            spare_sandbox.discard(spare)
            return None
        try:
            if spare.cgroup is not None:
                resources.adopt_cgroup(spare.cgroup, config, request.name, plan)
            return spare_sandbox.launch(spare, plan, request.payload, request.fd_map, lease)
        except (SandboxError, OSError) as e:  # a limit it cannot take, or it died: the cold path decides
            _log().info("spare sandbox not used: %s", e)
            spare_sandbox.discard(spare)
            return None

    def next_deadline(self) -> float | None:
        """The earliest wall deadline of the running sandboxes, or when a spare's
        root gets too old to be used (monotonic clock)."""
        deadlines = [s.deadline for s in self.running.values() if s.deadline is not None]
        deadlines += [s.made_at + spare_sandbox.ROOT_MAX_AGE for s in self._spares if s.rootfs is not None]
        return min(deadlines, default=None)

    def expire(self, now: float | None = None) -> list[int]:
        """Kill every sandbox past its deadline; returns their ids."""
        now = time.monotonic() if now is None else now
        expired = []
        for sandbox_id, spawned in self.running.items():
            deadline = spawned.deadline
            if deadline is not None and now >= deadline:
                spawned.timed_out = True
                self._thaw_quietly(sandbox_id)
                try:
                    spawned.kill()
                except Exception as e:  # noqa: BLE001 - init was signalled first; keep going
                    _log().error("cannot kill the cgroup of sandbox %s: %s", sandbox_id, e)
                expired.append(sandbox_id)
        return expired

    def arm(self, sandbox_id: int, at: float | None = None) -> None:
        """Start the wall clock of a pooled sandbox: its call has just been sent (at
        `at` on the monotonic clock, if given: the manager sends this after the call)."""
        spawned = self.running[sandbox_id]
        spawned.arm()
        if at is not None:
            spawned.started = min(at, spawned.started)

    def report(self, sandbox_id: int) -> SandboxResult | None:
        """The result of a sandbox whose init has reported its payload's end (its
        status pipe is readable), before init is reaped; None: wait for finish()."""
        spawned = self.running.get(sandbox_id)
        if spawned is None:
            return None  # finished already
        try:
            result = reported_result(spawned)
        except Exception as e:  # noqa: BLE001 - one sandbox's trouble must not stop the launcher
            _log().error("cannot read the report of sandbox %s: %s", sandbox_id, e)
            return None
        if result is not None:
            result = spawned.reported = _with_network_events(spawned, result)
        return result

    def finish(self, sandbox_id: int, *, defer_cgroup: bool = False) -> SandboxResult:
        """Reap an exited sandbox (its pidfd is readable) into its result. Its tree is
        gone then; `defer_cgroup`: its emptied cgroup is removed by remove_retired()
        (a zygote does that once the result is on its way)."""
        spawned = self.running.pop(sandbox_id)
        self._paused_by_signal.pop(sandbox_id, None)
        reported = spawned.reported
        try:
            result = finish_sandbox(spawned, destroy_cgroup=not defer_cgroup)
            if reported is None:
                result = _with_network_events(spawned, result)
        except Exception as e:  # noqa: BLE001 - one sandbox's trouble must not stop the launcher
            _log().error("cannot collect sandbox %s: %s", sandbox_id, e)
            result = SandboxResult(Outcome.SANDBOX_ERROR, error=f"the launcher could not collect it: {e}",
                                   isolation=spawned.isolation())
        finally:
            if spawned.ids is not None:
                spawned.ids.release()  # its tree is gone: the id is free for another sandbox
            if spawned.network is not None:
                spawned.network.release()  # its link, the host's table, its slot
        if defer_cgroup and spawned.cgroup is not None:
            self._retired.append(spawned.cgroup)
        return result

    def remove_retired(self) -> None:
        """Remove the cgroups of sandboxes finished with `defer_cgroup`."""
        while self._retired:
            cgroup = self._retired.pop()
            try:
                cgroup.destroy()
            except Exception as e:  # noqa: BLE001 - one sandbox's trouble must not stop the launcher
                _log().error("cannot remove the cgroup of a finished sandbox: %s", e)

    def kill(self, sandbox_id: int) -> None:
        """Kill the whole tree now."""
        spawned = self.running.get(sandbox_id)
        if spawned is not None:
            self._thaw_quietly(sandbox_id)
            spawned.kill()

    def signal(self, sandbox_id: int, sig: int) -> None:
        """Send `sig` to the sandbox's init, which forwards it to the payload."""
        spawned = self.running.get(sandbox_id)
        if spawned is not None:
            spawned.signal(sig)

    def freeze(self, sandbox_id: int) -> str:
        """Stop every process of the sandbox: the cgroup freezer, else SIGSTOP to the tree."""
        spawned = self.running[sandbox_id]
        if spawned.cgroup is not None:
            spawned.cgroup.freeze()
            return "cgroup freezer"
        import psutil

        pids = [spawned.pid] + [p.pid for p in psutil.Process(spawned.pid).children(recursive=True)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        self._paused_by_signal[sandbox_id] = pids
        return "SIGSTOP"

    def thaw(self, sandbox_id: int) -> None:
        """Undo freeze()."""
        spawned = self.running[sandbox_id]
        if spawned.cgroup is not None:
            spawned.cgroup.thaw()
        for pid in self._paused_by_signal.pop(sandbox_id, []):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _thaw_quietly(self, sandbox_id: int) -> None:
        try:
            self.thaw(sandbox_id)
        except (OSError, KeyError):
            pass  # a frozen tree is killed anyway (SIGKILL reaches frozen tasks)

    def update_limits(self, sandbox_id: int, changes: dict[str, int | None]) -> LimitUpdate:
        """Change the cgroup limits of a running sandbox (`changes`: config fields,
        checked by the caller, see live_limits.py). Raises LimitUpdateError naming the
        field when it cannot be changed here; then nothing was changed."""
        from ..live_limits import LimitUpdate, LimitUpdateError  # not on `ndf-sandbox run`'s path

        spawned = self.running[sandbox_id]
        field = next(iter(changes))
        if spawned.cgroup is None:
            raise LimitUpdateError(field, "this sandbox has no cgroup (none could be made here, or it was "
                                          "started without limits and accounting): its limits cannot change")
        plan = spawned.plan
        for name in changes:
            if getattr(plan.config, name) is not None and name not in plan.limits.by_cgroup:
                raise LimitUpdateError(name, "is enforced by an rlimit in this sandbox (no cgroup controller "
                                             "for it here), which cannot change while it runs")
        config = dataclasses.replace(plan.config, **changes)  # type: ignore[arg-type]
        by_cgroup = plan.limits.by_cgroup | {n for n, v in changes.items() if v is not None}
        new_plan = dataclasses.replace(plan, config=config,
                                       limits=dataclasses.replace(plan.limits, by_cgroup=frozenset(by_cgroup)))
        cgroup, old = spawned.cgroup, spawned.cgroup.limits
        try:
            limits = dataclasses.replace(resources.cgroup_limits(config, new_plan),
                                         memory_high_bytes=old.memory_high_bytes, swap_bytes=old.swap_bytes)
            before = cgroup.stats()
            try:
                cgroup.update(limits)
            except BaseException:
                _restore_limits(cgroup, old)  # a file written before the one that failed
                raise
        except UnsupportedError as e:
            e = resources.in_config_terms(e)
            raise LimitUpdateError(e.protection, e.reason) from None
        except SetupError as e:  # a control file refused the value
            if e.errno == errno.EBUSY and "memory_limit_mb" in changes:
                raise LimitUpdateError("memory_limit_mb", f"the kernel refused {changes['memory_limit_mb']} MiB: "
                                       "the sandbox uses more that it cannot reclaim (cgroup v1 refuses a "
                                       "limit below that instead of OOM-killing); the limit is unchanged") from None
            raise LimitUpdateError(field, f"cannot be written to the cgroup: {e}") from None
        except OSError as e:  # its cgroup is gone: it has ended
            raise LimitUpdateError(field, f"cannot be changed: {e}") from None
        spawned.plan = new_plan  # a later update starts from here
        after = cgroup.stats()
        return LimitUpdate(previous={n: getattr(plan.config, n) for n in changes}, applied=dict(changes),
                           memory_current_bytes=after.memory_current_bytes,
                           oom_kills=max(0, after.oom_kills - before.oom_kills))

    def stats(self, sandbox_id: int) -> dict[str, Any]:
        """Live usage from the kernel (cgroup, else /proc of the tree), named as in
        ResourceUsage, plus the current values `memory_current_bytes`,
        `processes_current` and `frozen` (1.0 or 0.0)."""
        spawned = self.running[sandbox_id]
        if spawned.cgroup is not None:
            now = spawned.cgroup.stats()
            stats = dataclasses.asdict(usage_from_cgroup(now, time.monotonic() - spawned.started))
            stats.update(memory_current_bytes=now.memory_current_bytes, processes_current=now.pids_current,
                         frozen=float(now.frozen))
            return stats
        stats = dataclasses.asdict(self.usage(sandbox_id))
        import psutil  # no cgroup: read the tree from /proc

        try:
            tree = [psutil.Process(spawned.pid)]
            tree += tree[0].children(recursive=True)
            rss = sum(p.memory_info().rss for p in tree)
        except psutil.Error:
            rss, tree = 0, []
        stats.update(memory_current_bytes=rss, processes_current=len(tree),
                     frozen=float(sandbox_id in self._paused_by_signal))
        return stats

    def usage(self, sandbox_id: int) -> ResourceUsage:
        """What the sandbox has used so far, from the kernel (cgroup, else /proc)."""
        spawned = self.running[sandbox_id]
        wall = time.monotonic() - spawned.started
        if spawned.cgroup is not None:
            return usage_from_cgroup(spawned.cgroup.stats(), wall)
        import psutil  # no cgroup: read the tree from /proc

        try:
            tree = [psutil.Process(spawned.pid)]
            tree += tree[0].children(recursive=True)
            times = [p.cpu_times() for p in tree]
            return ResourceUsage(wall_seconds=wall, cpu_user_seconds=sum(t.user for t in times),
                                 cpu_system_seconds=sum(t.system for t in times),
                                 memory_peak_bytes=max(p.memory_info().rss for p in tree),
                                 processes_peak=len(tree))
        except psutil.Error:
            return ResourceUsage(wall_seconds=wall)

    def collect(self, sandbox_id: int) -> ResourceUsage:
        """The plugin has answered: read its usage, then kill the tree (it is reaped,
        and its cgroup removed, when the exit is seen as usual)."""
        usage = self.usage(sandbox_id)
        self.kill(sandbox_id)
        return usage

    def prepare_next(self, announce: Callable[[], None] = lambda: None) -> bool:
        """Idle time (a zygote between requests): make one more thing for the next
        sandbox, off its critical path: a spare sandbox (one for each root of the
        latest launches), a network namespace, a cgroup. Not while a sandbox of
        ours works: it would compete with it for the CPU (one that has ended its
        payload or was killed is only torn down by the kernel now). False when
        nothing is left to make (now). `announce` is called before work that takes
        milliseconds and cannot be interrupted (the spare, the cgroup): a launch
        sent meanwhile would wait for it."""
        if self._working():
            return False
        for spare in [s for s in self._spares if not spare_sandbox.alive(s)]:
            self._spare_failures += 1  # it failed a stage before its launch (logged)
            self._discard_spare(spare)
        for spare in [s for s in self._spares if s.rootfs not in self._spare_roots or spare_sandbox.root_stale(s)]:
            announce()  # no recent launch has its root, or it is old
            self._discard_spare(spare)
        missing = [r for r in self._spare_roots if all(s.rootfs != r for s in self._spares)]
        if self.spares and missing and self._spare_failures < MAX_SPARE_FAILURES and not self.template_lost:
            announce()
            made = self._make_spare(missing[0])
            if made is not None:
                self._spares.append(made)
            if self.netns_ahead:  # the next spare's, at once (in a thread): a launch may come before
                network.make_ahead()  # the next idle moment, and a clone without one makes it (~1 ms)
            return True
        if self.netns_ahead and network.make_ahead():  # in a thread: nothing to announce
            return True
        if resources.spare_cgroup_wanted():
            announce()
            return resources.make_spare_cgroup()
        return False

    def _working(self) -> bool:
        """Whether a sandbox of ours may still be running its payload."""
        return any(not s.killed and s.reported is None for s in self.running.values())

    def template_gone(self, why: str) -> None:
        """The template died: start nothing more. Not cloned from this process instead:
        its memory holds earlier requests (their calls, i.e. documents), which a
        sandbox forked from it could read."""
        if not self.template_lost:
            self.template_lost = f"{why}: this launcher starts no more sandboxes"
            _log().error("%s", self.template_lost)

    def discard_spares(self) -> None:
        """Remove the spares made so far (they took this process's rlimits, say, and
        its next launch is to take others)."""
        while self._spares:
            self._discard_spare(self._spares[0])

    def _discard_spare(self, spare: Spare) -> None:
        self._spares.remove(spare)
        spare_sandbox.discard(spare)

    def _make_spare(self, rootfs: RootfsPlan | None) -> Spare | None:
        cgroup = resources.cgroup_for_spare()
        try:
            return spare_sandbox.make_spare(plan_launch(SandboxConfig()).namespaces, cgroup,  # the default's
                                            self.template, rootfs)
        except (SandboxError, OSError) as e:
            if isinstance(e, TemplateGone):
                self.template_gone(str(e))
            self._spare_failures += 1
            _log().warning("cannot make a spare sandbox: %s", e)
            if cgroup is not None:
                cgroup.destroy()
            return None

    def shutdown(self) -> list[tuple[int, SandboxResult]]:
        """Kill and reap everything still running; remove the spares."""
        results = []
        for sandbox_id in list(self.running):
            self.kill(sandbox_id)
            results.append((sandbox_id, self.finish(sandbox_id)))
        self.discard_spares()
        self.remove_retired()
        resources.discard_spare_cgroup()
        return results
