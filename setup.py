"""Build the one C extension: the sandbox child's steps (Linux only; see _child.c).

The build writes nothing into the checkout (which may be read-only, e.g. root's
checkout installed by an unprivileged user): its build directory and egg-info go
to a temporary directory, removed when the build ends.
"""

import atexit
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

_HINT = ("the C extension neural_doc_flow_security.sandbox.linux._child needs a C compiler and the "
         "Python headers: install them (Debian/Ubuntu: apt-get install gcc python3-dev; Fedora: "
         "dnf install gcc python3-devel) or install a binary wheel")


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


_scratch = tempfile.mkdtemp(prefix="ndf-build-")
atexit.register(shutil.rmtree, _scratch, True)

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(Extension(
        "neural_doc_flow_security.sandbox.linux._child",
        ["src/neural_doc_flow_security/sandbox/linux/_child.c"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"],
    ))
setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtWithHint},
    options={"build": {"build_base": f"{_scratch}/build"}, "egg_info": {"egg_base": _scratch}},
)
