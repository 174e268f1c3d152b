"""Optional integrations with cluster engines: every task of a Dask or Ray cluster
in its own sandbox (`integrations.dask`, `integrations.ray`). Each needs its extra
(`pip install 'neural-doc-flow-security[dask]'` / `[ray]`); the core never imports them."""

from __future__ import annotations

from typing import Any


def refuse_fork(start_method: Any, engine: str) -> None:
    """A Dask or Ray worker runs threads (its event loop, its communication): a
    sandbox forked from it could inherit a lock held by another thread, and would
    hold the worker's memory. Only start methods that never fork the host are allowed."""
    if start_method == "fork":
        raise ValueError(f"start_method: 'fork' forks the {engine} worker process, which runs threads; "
                         "use 'zygote' (the default: sandboxes are cloned from a separate, single-threaded "
                         "process) or 'posix'")
