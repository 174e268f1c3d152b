"""`ndf-sandbox run ...`, its sandbox started from a spare (launch/spare.py) where the
config allows it: the escape suite's third caller (root only). Usage as the CLI:
`python tests/spare_runner.py run [options] -- command`."""

from __future__ import annotations

import sys

from neural_doc_flow_security.sandbox import cli
from neural_doc_flow_security.sandbox.launch import spare, supervise
from neural_doc_flow_security.sandbox.launch.launcher import Launcher

made: list[Launcher] = []


class LauncherWithSpare(Launcher):
    """A launcher that has made its spare before the launch, as a zygote does when idle."""

    def __init__(self) -> None:
        super().__init__(spares=True)
        self._spare = self._make_spare()
        if self._spare is None:
            raise SystemExit("spare_runner: no spare could be made")
        made.append(self)


if __name__ == "__main__":
    supervise.Launcher = LauncherWithSpare  # type: ignore[misc]
    try:
        code = cli.main(sys.argv[1:])
    finally:
        for launcher in made:
            if launcher._spare is not None:  # the config did not fit it
                spare.discard(launcher._spare)
    sys.exit(code)
