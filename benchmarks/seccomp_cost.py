"""What the default seccomp filter costs: per syscall, and to install per sandbox.

    python benchmarks/seccomp_cost.py [--rounds 9] [--profile default|FILE ...]

Per syscall: a small C loop (built here with gcc) installs the exported BPF
(`SeccompProgram.bpf`, exactly what the sandbox child installs) and times
`getppid` (allowed, no argument checks: the kernel's per-syscall cache skips
the filter), `openat`+`close`, `openat(O_CREAT, 0644)`+`close` and
`socket(AF_UNIX)`+`close` (argument checks run), against the same loop with no
filter. Runs are interleaved round by round; medians are printed. Install: one
`seccomp(2)` call in a forked child, as linux/_child.c does.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from neural_doc_flow_security.sandbox.linux import seccomp

LOOP_C = r"""
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
int main(int argc, char **argv) {
    const char *scratch = argv[1];
    if (argc > 2) {
        static struct sock_filter insns[4096];
        FILE *f = fopen(argv[2], "rb");
        size_t n = fread(insns, sizeof insns[0], 4096, f);
        fclose(f);
        struct sock_fprog prog = { .len = (unsigned short)n, .filter = insns };
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) { perror("seccomp"); return 1; }
    }
    const int n = 400000;
    double t = now();
    for (int i = 0; i < n; i++) syscall(SYS_getppid);
    double getppid = (now() - t) / n; t = now();
    for (int i = 0; i < n / 4; i++) close(openat(AT_FDCWD, "/dev/null", O_RDONLY));
    double open_close = (now() - t) / (n / 4); t = now();
    for (int i = 0; i < n / 4; i++) close(openat(AT_FDCWD, scratch, O_CREAT | O_WRONLY, 0644));
    double creat_close = (now() - t) / (n / 4); t = now();
    for (int i = 0; i < n / 4; i++) close(socket(AF_UNIX, SOCK_STREAM, 0));
    double socket_close = (now() - t) / (n / 4);
    printf("%.1f %.1f %.1f %.1f\n", getppid, open_close, creat_close, socket_close);
    return 0;
}
"""
COLUMNS = ("getppid", "openat+close", "openat(O_CREAT)+close", "socket(AF_UNIX)+close")


def install_micros(program: seccomp.SeccompProgram) -> float:
    """Microseconds one install_program takes in a fresh forked child."""
    libc = ctypes.CDLL(None, use_errno=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        start = time.perf_counter_ns()
        seccomp.install_program(program)
        os.write(write_end, str(time.perf_counter_ns() - start).encode())
        os._exit(0)
    os.close(write_end)
    took = int(os.read(read_end, 64)) / 1000
    os.close(read_end)
    os.waitpid(pid, 0)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="append", default=[], help="default, or a profile file")
    args = parser.parse_args()
    gcc = shutil.which("gcc")
    if gcc is None:
        print("gcc is needed to build the syscall loop", file=sys.stderr)
        return 1
    programs = {spec: seccomp.compile_profile(spec) for spec in args.profile or ["default"]}
    with tempfile.TemporaryDirectory(prefix="ndf-seccomp-cost-") as work:
        loop = os.path.join(work, "loop")
        with open(loop + ".c", "w") as f:
            f.write(LOOP_C)
        subprocess.run([gcc, "-O2", "-o", loop, loop + ".c"], check=True)
        commands = {"no filter": [loop, os.path.join(work, "scratch")]}
        for spec, program in programs.items():
            path = os.path.join(work, f"{len(commands)}.bpf")
            with open(path, "wb") as f:
                f.write(program.bpf)
            commands[f"{spec} ({program.instructions} insns)"] = [loop, os.path.join(work, "scratch"), path]
        per_call: dict[str, list[list[float]]] = {name: [] for name in commands}
        installs: dict[str, list[float]] = {spec: [] for spec in programs}
        for _ in range(args.rounds):
            for name, command in commands.items():
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                per_call[name].append([float(x) for x in out.split()])
            for _ in range(5):
                for spec, program in programs.items():
                    installs[spec].append(install_micros(program))
    print("median ns per call: " + " | ".join(COLUMNS))
    for name, rows in per_call.items():
        print(f"  {name}: " + " | ".join(f"{statistics.median(r[i] for r in rows):.0f}" for i in range(len(COLUMNS))))
    for spec, times in installs.items():
        print(f"install {spec}: median {statistics.median(times):.0f} us over {len(times)} children")
    return 0


if __name__ == "__main__":
    sys.exit(main())
