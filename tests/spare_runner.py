"""`ndf-sandbox run ...`, its sandbox started from a spare (launch/spare.py) where the
config allows it: the escape suite's third caller (root only). Usage as the CLI:
`python tests/spare_runner.py run [options] -- command`."""

from __future__ import annotations

import sys

from neural_doc_flow_security.sandbox import cli
from neural_doc_flow_security.sandbox.launch import spare, supervise
from neural_doc_flow_security.sandbox.launch.launcher import Launcher, LaunchRequest, effective_config
from neural_doc_flow_security.sandbox.launch.plan import plan_launch
from neural_doc_flow_security.sandbox.launch.spawn import SpawnedSandbox

made: list[Launcher] = []


class LauncherWithSpare(Launcher):
    """A launcher that has made its spare before the launch, as a zygote does when
    idle after a launch like it: the spare has built the root too, where the
    config allows (spare.root_to_build_ahead)."""

    def __init__(self) -> None:
        super().__init__(spares=True)
        made.append(self)

    def start(self, sandbox_id: int, request: LaunchRequest) -> SpawnedSandbox:
        made_ahead = self._make_spare(spare.root_to_build_ahead(plan_launch(effective_config(request))))
        if made_ahead is None:
            raise SystemExit("spare_runner: no spare could be made")
        self._spares.append(made_ahead)
        return super().start(sandbox_id, request)


if __name__ == "__main__":
    supervise.Launcher = LauncherWithSpare  # type: ignore[misc]
    try:
        code = cli.main(sys.argv[1:])
    finally:
        for launcher in made:
            for unused in launcher._spares:  # the config did not fit it
                spare.discard(unused)
    sys.exit(code)
