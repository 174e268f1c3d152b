"""The child's bootstrap: every protection, in order, in one place.

`child_steps` lists what the clone3 child does, as data; the C extension
(linux/_child.c) executes the list with no Python running between the clone
and the payload. Any step that fails reports "stage, errno, message" on the
error pipe and the process exits: nothing half-protected ever runs the payload
(fail closed).

    init stages                          confinement (_confine)
    1 new session                        10 file descriptors (map, close the rest)
    2 signals reset                      11 rlimits
    3 parent-death signal                12 identity (the sandbox's own id, or uid/gid)
    4 wait for the id maps               13 parent-death signal, re-armed
    5 not dumpable                       14 capabilities
    6 mounts (new root, pivot_root)      15 no_new_privs
    7 hostname, loopback, the connect    16 landlock (linux/landlock.py)
      proxy's socket (rootless policy)   17 seccomp (last)
    8 wait for the cgroup
    9 a program: init confines itself    18 exec / run the callable (the error
      and posix_spawns it; a callable       pipe is closed first: nothing
      (or a program, learning its           untrusted ever holds it)
      syscalls): init forks, the child
      confines itself (its seccomp
      listener goes to init) and returns
      to Python to run it (or execs);
      init drops to the same uid, reaps,
      forwards signals and answers the
      seccomp listener

The child is the sandbox's pid 1. The parent releases it twice: once the user
namespace's id maps are written (b"m", only with a user namespace), and once
it is in its cgroups (b"c"). As root, the network namespace is made ahead of
the clone (linux/network.py) and joined first.
The mounts run in between, overlapping the slow cgroup v1 migration; no process
is forked, and nothing untrusted runs, before the child is in its cgroups.

A spare (launch/spare.py, made by an idle zygote) runs the same list split in
two: `spare_steps` (stages 1-3 and 5, then it drops every inherited fd, joins
its cgroup itself, builds the root of a recent launch if asked (stage 6) and
waits) ahead of any request, and `launch_steps` (stage 6 or 7 on) once a launch
sends them. Nothing else of a config is applied before the launch.
"""

from __future__ import annotations

import functools
import resource
import signal
from dataclasses import dataclass

from ..linux import syscalls as sc
from ..linux.landlock import landlock_steps
from ..linux.rootfs import RootfsPlan, rootfs_steps
from ..linux.steps import Step, StepTuple
from .payload import ExecPayload, Payload
from .plan import LaunchPlan

__all__ = ["ChildPipes", "ExecPayload", "Payload", "child_steps", "launch_steps", "spare_steps"]


@dataclass(frozen=True)
class ChildPipes:
    """The child's ends of the pipes to its parent."""

    sync_read: int     # parent writes b"m" after the id maps, b"c" after the cgroup
    error_write: int   # CLOEXEC: closed by exec, so EOF means "all stages passed"
    status_write: int  # init reports the payload's wait status here
    changes_write: int = -1  # a copy-on-write root's tmpfs is sent here (rootfs.hands_back_changes)
    proxy_write: int = -1  # the connect proxy's listening socket is sent here (linux/connect_proxy.py)


def _stage(name: str, *steps: StepTuple) -> list[StepTuple]:
    return [(Step.STAGE, name.encode()), *steps]


def _confine(plan: LaunchPlan, program: bool, fd_map: tuple[tuple[int, int], ...], keep_also: tuple[int, ...],
             still_supervised: StepTuple, *, skip_rlimits: tuple[int, ...] = ()) -> list[StepTuple]:
    """The stages that confine the payload, in order; the last is seccomp.
    `skip_rlimits`: rlimits the caller applies later itself."""
    cfg = plan.config
    caps = plan.capabilities
    fd_pairs = b"".join(t.to_bytes(4, "little") + s.to_bytes(4, "little") for t, s in fd_map)
    keep = b"".join(fd.to_bytes(4, "little") for fd in keep_also)
    steps = _stage("file descriptors", (Step.ARRANGE_FDS, fd_pairs, keep))
    steps += _stage("umask", (Step.UMASK, _launching_umask()))  # the caller's again (see _init_start)
    steps += _stage("rlimits", *((Step.SETRLIMIT, which, value) for which, value in plan.rlimits.limits
                                 if which not in skip_rlimits))
    steps += _stage("identity", (Step.IDENTITY, *_ids(plan), int(plan.namespaces.user)))
    steps += _stage("parent-death signal", still_supervised)  # the uid change cleared it
    if not caps.keep_all:
        ambient = sum(1 << cap for cap in caps.ambient)
        steps += _stage("capabilities", (Step.CAPABILITIES, caps.allowed_mask, ambient, caps.last_cap))
    if cfg.no_new_privs:
        steps += _stage("no_new_privs", (Step.PRCTL, sc.PR_SET_NO_NEW_PRIVS, 1))
    if plan.landlock is not None:
        steps += _stage("landlock", *landlock_steps(plan.landlock))
    filter_ = plan.seccomp_for(program)
    if filter_.learns:  # the deny list, then the filter whose every call init records
        steps += _stage("seccomp", (Step.SECCOMP, filter_.bpf, 0), (Step.SECCOMP, filter_.learn_bpf, 1))
    elif filter_.reports:  # its refusals go to init, which answers and counts them
        steps += _stage("seccomp", (Step.SECCOMP, filter_.reported_bpf, 1))
    elif filter_.enabled:
        steps += _stage("seccomp", (Step.SECCOMP, filter_.bpf, 0))
    return steps


def _listener(plan: LaunchPlan, program: bool, hand_over: bool) -> list[StepTuple]:
    """Prepare init's seccomp listener: init answers and counts the calls the filter refers
    to it. `hand_over`: the forked payload sends it its filter's listener (else init
    installs the filter on itself)."""
    filter_ = plan.seccomp_for(program)
    mode = 2 if filter_.learns else 1 if filter_.reports else 0
    if not mode:
        return []
    return _stage("seccomp listener", (Step.LISTENER, mode, filter_.notify_errnos, int(hand_over)))


def _ids(plan: LaunchPlan) -> tuple[int, int]:
    """The payload's uid and gid; -1: the launch's own (its sandbox id, packed with
    the launch: the steps stay the same for every launch of a config)."""
    return (-1 if plan.uid is None else plan.uid, -1 if plan.gid is None else plan.gid)


def _launching_umask() -> int:
    """This process's umask, read (os.umask would change it for a moment)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _init_start() -> list[StepTuple]:
    """The first init stages (this process is pid 1 of the new pid namespace)."""
    # The root is built with a umask of 022 whatever the caller's: with 027, say, its
    # directories (made by root) could not be searched by the sandbox's uid.
    steps = _stage("umask", (Step.UMASK, 0o022))
    steps += _stage("new session", (Step.SETSID,))
    steps += _stage("signals", (Step.RESET_SIGNALS,))
    steps += _stage("parent-death signal", (Step.PRCTL, sc.PR_SET_PDEATHSIG, signal.SIGKILL))
    return steps


# Not dumpable (only after the id maps: an unprivileged parent writes them through
# /proc/<pid>): the payload, same uid in a user namespace, must never open /proc/1/fd/*.
_NOT_DUMPABLE = _stage("not dumpable", (Step.PRCTL, sc.PR_SET_DUMPABLE, 0))


def _sandbox_steps(plan: LaunchPlan, program: bool, pipes: ChildPipes, fd_map: tuple[tuple[int, int], ...],
                   loopback: bool, cgroup_token: bool, mounted: bool = False) -> list[StepTuple]:
    """From the mounts (unless `mounted`: a spare built the root) to the payload."""
    names = plan.namespaces.names
    steps: list[StepTuple] = []
    if plan.rootfs is not None and not mounted:
        steps += _stage("mounts", *rootfs_steps(plan.rootfs, pipes.changes_write))
    if "uts" in names:
        steps += _stage("hostname", (Step.SETHOSTNAME, plan.config.hostname.encode()))
    if "net" in names and loopback:
        steps += _stage("loopback", (Step.LOOPBACK_UP,))
    if "net" in names and pipes.proxy_write >= 0:
        from ..linux.connect_proxy import PROXY_PORT  # only here: a run without the proxy imports none of it

        steps += _stage("connect proxy", (Step.PROXY_LISTENER, pipes.proxy_write, PROXY_PORT))
    if cgroup_token:
        steps += _stage("wait for the cgroup", (Step.WAIT_TOKEN, pipes.sync_read, ord("c")))
    if "pid" not in names:
        steps += _stage("child subreaper", (Step.PRCTL, sc.PR_SET_CHILD_SUBREAPER, 1))

    if program and "pid" in names and not plan.seccomp_for(program).learns:
        # A program: init confines itself, then starts the program with posix_spawn;
        # the program inherits every protection. In the pid namespace the program
        # cannot kill init. Init keeps the filter's listener (the reported filter
        # never refers init's own calls to it); learning, it must stay outside the
        # filter, which refers every call.
        # An address-space limit is set in the program's own process just before its
        # execve: init is a copy of a large Python process and could map nothing under it.
        address_space = dict(plan.rlimits.limits).get(resource.RLIMIT_AS, -1)
        steps += _listener(plan, program, hand_over=False)
        steps += _confine(plan, program, fd_map, (pipes.status_write, pipes.sync_read),
                          (Step.STILL_SUPERVISED, pipes.sync_read), skip_rlimits=(resource.RLIMIT_AS,))
        steps += _stage("exec", (Step.SPAWN_PROGRAM, pipes.status_write, address_space))
        return steps

    # A Python callable (or no pid namespace): fork the payload, which confines
    # itself; init takes the payload's uid/gid with no capability (enough to signal it).
    # Init re-arms its parent-death signal after the uid change, checking the sync pipe.
    steps += _listener(plan, program, hand_over=True)
    steps += _stage("fork the payload", (Step.FORK_PAYLOAD, pipes.status_write, *_ids(plan),
                                         int(plan.namespaces.user), pipes.sync_read))
    steps += _stage("parent-death signal", (Step.DIE_WITH_INIT,))
    steps += _confine(plan, program, fd_map, (), (Step.DIE_WITH_INIT,))
    # Every stage passed. A callable is untrusted code that never execs: RETURN
    # closes the error pipe (close-on-exec) by hand before it runs.
    steps += _stage("exec", (Step.EXEC_PROGRAM,) if program else (Step.RETURN,))
    return steps


def _join_netns(netns_fd: int | None) -> list[StepTuple]:
    return _stage("network namespace", (Step.SETNS, netns_fd, sc.CLONE_NEWNET)) if netns_fd is not None else []


@functools.lru_cache(maxsize=64)
def child_steps(plan: LaunchPlan, program: bool, pipes: ChildPipes, fd_map: tuple[tuple[int, int], ...],
                netns_fd: int | None = None, parent_sync_write: int | None = None) -> tuple[StepTuple, ...]:
    """Everything the clone3 child does, in order, for a program (`program`) or a
    Python callable. `netns_fd`: a network namespace made ahead (lo up) to join
    instead of cloning one (see linux/network.py). `parent_sync_write`: the parent's
    end of the sync pipe, which a child cloned by this process (no template) holds
    a copy of until it closes it."""
    # Above every fd the payload is to get, so that the fd map cannot collide with it.
    steps: list[StepTuple] = [(Step.MOVE_ERROR_FD, max((target for target, _ in fd_map), default=2) + 1)]
    steps += _join_netns(netns_fd) + _init_start()
    if parent_sync_write is not None:
        # A parent killed before the parent-death signal was armed: with our copy of
        # its end closed, the pipe hangs up (else we would wait for its token forever).
        steps += _stage("parent-death signal", (Step.CLOSE, parent_sync_write),
                        (Step.STILL_SUPERVISED, pipes.sync_read))
    if plan.namespaces.user:
        steps += _stage("wait for the id maps", (Step.WAIT_TOKEN, pipes.sync_read, ord("m")))
    steps += _NOT_DUMPABLE
    steps += _sandbox_steps(plan, program, pipes, fd_map, loopback=netns_fd is None, cgroup_token=True)
    return tuple(steps)


def spare_steps(pipes: ChildPipes, netns_fd: int | None, cgroup_procs: tuple[int, ...], launch_socket: int,
                staging: int, rootfs: RootfsPlan | None = None) -> tuple[StepTuple, ...]:
    """A spare's steps (launch/spare.py): the same first stages, then it drops every
    inherited fd but its own, joins its cgroup (v1: cgroup.procs fds), builds
    `rootfs` if given, and waits for its launch, whose steps are `launch_steps`.
    Nothing else of a config is applied yet."""
    keep = (pipes.sync_read, pipes.status_write, launch_socket, *cgroup_procs)
    # The error pipe (and a benchmark's trace fd) above the fds the launch stages from `staging` on.
    steps: list[StepTuple] = [(Step.MOVE_ERROR_FD, staging + 16)]
    steps += _join_netns(netns_fd) + _init_start() + _NOT_DUMPABLE
    steps += _stage("file descriptors", (Step.ARRANGE_FDS, b"", b"".join(fd.to_bytes(4, "little") for fd in keep)))
    if cgroup_procs:
        steps += _stage("cgroup", (Step.JOIN_CGROUP, b"".join(fd.to_bytes(4, "little") for fd in cgroup_procs)))
    if rootfs is not None:
        steps += _stage("mounts", *rootfs_steps(rootfs))
    steps += _stage("wait for the launch", (Step.AWAIT_LAUNCH, launch_socket, staging))
    return tuple(steps)


@functools.lru_cache(maxsize=64)
def launch_steps(plan: LaunchPlan, program: bool, pipes: ChildPipes, fd_map: tuple[tuple[int, int], ...],
                 loopback: bool, mounted: bool = False) -> tuple[StepTuple, ...]:
    """What a spare does once launched: the rest of child_steps (it is in its cgroup
    already, and `mounted`: its root is built)."""
    return tuple(_sandbox_steps(plan, program, pipes, fd_map, loopback=loopback, cgroup_token=False,
                                mounted=mounted))
