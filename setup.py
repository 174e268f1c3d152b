"""Build the one C extension: the sandbox child's steps (Linux only; see _child.c)."""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(Extension(
        "neural_doc_flow_security.sandbox.linux._child",
        ["src/neural_doc_flow_security/sandbox/linux/_child.c"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"],
    ))
setup(ext_modules=extensions)
