"""Build the C parts (Linux only): the extension with the sandbox child's steps
(_child.c) and the native `ndf-sandbox` program (cli_client.c), which runs the
Python CLI, the console script `ndf-sandbox-py`, or hands `run` to a CLI server.
Each build gets a fresh random build id, compiled into the program and written to
the built package's _build_id.py: a program talks only to a server of its own build.

The build writes nothing into the checkout (which may be read-only, e.g. root's
checkout installed by an unprivileged user): its build directory and egg-info go
to a temporary directory, removed when the build ends.
"""

import atexit
import os
import secrets
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

from distutils.command.build_scripts import build_scripts  # after setuptools: its own distutils

_HINT = ("the C extension neural_doc_flow_security.sandbox.linux._child needs a C compiler and the "
         "Python headers: install them (Debian/Ubuntu: apt-get install gcc python3-dev; Fedora: "
         "dnf install gcc python3-devel) or install a binary wheel")
_CLIENT_SOURCE = "src/neural_doc_flow_security/sandbox/cli_client.c"
_BUILD_ID = secrets.token_hex(8)
_CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]


class BuildExtWithHint(build_ext):
    """build_ext that says what to install when the compiler or Python.h is missing."""

    def run(self) -> None:
        header = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not header.is_file():
            raise PlatformError(f"{header} is missing: {_HINT}")
        try:
            super().run()
        except (CCompilerError, CompileError, ExecError, PlatformError) as e:
            raise PlatformError(f"{e}\n{_HINT}") from None


class BuildPyWithId(build_py):
    """build_py that writes this build's id into the built _build_id.py."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, "neural_doc_flow_security", "sandbox", "_build_id.py")
        target.unlink(missing_ok=True)  # a copy, maybe a hard link: never write through to the checkout
        target.write_text(f'"""The id of this build (see setup.py)."""\n\nBUILD_ID = "{_BUILD_ID}"\n')


class BuildClient(build_scripts):
    """build_scripts that compiles the one script, cli_client.c, into the native
    `ndf-sandbox` program (libc only), with this build's id compiled in."""

    def run(self) -> None:
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler

        build_temp = self.get_finalized_command("build").build_temp
        compiler = new_compiler()
        customize_compiler(compiler)
        try:
            objects = compiler.compile([_CLIENT_SOURCE], output_dir=build_temp, extra_postargs=_CFLAGS,
                                       macros=[("NDF_BUILD_ID", f'"{_BUILD_ID}"')])
            compiler.link_executable(objects, "ndf-sandbox", output_dir=build_temp)
        except (CCompilerError, CompileError, ExecError, PlatformError, LinkError) as e:
            raise PlatformError(f"{e}\n{_HINT}") from None
        self.mkpath(self.build_dir)
        target = os.path.join(self.build_dir, "ndf-sandbox")
        self.copy_file(os.path.join(build_temp, "ndf-sandbox"), target)
        os.chmod(target, 0o755)

    def get_outputs(self) -> list[str]:
        return [os.path.join(self.build_dir, "ndf-sandbox")]


_scratch = tempfile.mkdtemp(prefix="ndf-build-")
atexit.register(shutil.rmtree, _scratch, True)

extensions = []
scripts = []
console_scripts = ["ndf-sandbox = neural_doc_flow_security.sandbox.cli:main"]
if sys.platform.startswith("linux"):
    scripts = [_CLIENT_SOURCE]  # built by BuildClient into the program `ndf-sandbox`
    console_scripts = ["ndf-sandbox-py = neural_doc_flow_security.sandbox.cli:main"]
    extensions.append(Extension(
        "neural_doc_flow_security.sandbox.linux._child",
        ["src/neural_doc_flow_security/sandbox/linux/_child.c"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"],
    ))
setup(
    ext_modules=extensions,
    scripts=scripts,
    entry_points={"console_scripts": console_scripts},
    cmdclass={"build_ext": BuildExtWithHint, "build_py": BuildPyWithId, "build_scripts": BuildClient},
    options={"build": {"build_base": f"{_scratch}/build"}, "egg_info": {"egg_base": _scratch}},
)
