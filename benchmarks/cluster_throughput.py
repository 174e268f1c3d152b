"""Scenario `cluster` of benchmarks/run.py: documents per second through a local Dask
cluster of two worker processes (TCP on 127.0.0.1), with and without the sandbox.

The corpus is the demo's six sample documents (two PDFs through pypdf, two HTML
pages, two text files), repeated; every document is one task (`client.map`).
Rows, interleaved in a shuffled order each round on the same cluster:
- no sandbox: the worker's own thread pool;
- sandbox: every task in a fresh sandbox (SandboxPlugin, the demo's good-plugin limits);
- sandbox, pypdf preloaded: the same, with `preload=("pypdf",)`, so a sandbox does
  not import pypdf itself.
Each worker runs 2 tasks at once (threads_per_worker=2) in every row.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from typing import Any

WORKERS = 2
THREADS_PER_WORKER = 2


def parse_document(name: str, data: bytes) -> str:
    """The demo's good plugin for the document's kind."""
    from neural_doc_flow_security.sandbox import demo_plugins

    if name.endswith(".pdf"):
        return demo_plugins.extract_pdf_text(data)
    if name.endswith(".html"):
        return demo_plugins.html_to_text(data)
    return demo_plugins.count_words(data)


def corpus(size: int) -> list[tuple[str, bytes]]:
    import importlib.resources

    samples = importlib.resources.files("neural_doc_flow_security.sandbox").joinpath("samples")
    documents = sorted((entry.name, entry.read_bytes()) for entry in samples.iterdir() if entry.is_file())
    return [documents[i % len(documents)] for i in range(size)]


def run_all(quick: bool, table_class: Any) -> list[Any]:
    import dask
    from dask.distributed import Client, LocalCluster

    from neural_doc_flow_security.sandbox.demo import GOOD_CONFIG
    from neural_doc_flow_security.sandbox.integrations.dask import SandboxPlugin

    documents = corpus(36 if quick else 120)
    rounds = 3 if quick else 7
    rows = {"no sandbox": "default", "sandbox": "sandbox", "sandbox, pypdf preloaded": "sandbox-pypdf"}
    rates: dict[str, list[float]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory(prefix="ndf-bench-dask-") as scratch, \
            dask.config.set({"temporary-directory": scratch}), \
            LocalCluster(n_workers=WORKERS, processes=True, threads_per_worker=THREADS_PER_WORKER, host="127.0.0.1",
                         protocol="tcp", dashboard_address=None, worker_dashboard_address=None,
                         local_directory=scratch) as cluster, Client(cluster) as client:
        client.register_plugin(SandboxPlugin(GOOD_CONFIG))
        client.register_plugin(SandboxPlugin(GOOD_CONFIG, name="sandbox-pypdf", preload=["pypdf"]))
        names, blobs = [name for name, _ in documents], [blob for _, blob in documents]
        scattered = client.scatter(blobs, broadcast=True)  # the same bytes in every row, sent once

        def one_round(executor: str) -> float:
            started = time.perf_counter()
            with dask.annotate(executor=executor):
                futures = client.map(parse_document, names, scattered, pure=False)
            texts = client.gather(futures)
            elapsed = time.perf_counter() - started
            assert all(isinstance(text, str) and text for text in texts)
            return len(texts) / elapsed

        for executor in rows.values():  # warm up: the workers import pypdf, the zygotes start
            one_round(executor)
        for _ in range(rounds):
            order = list(rows.items())
            random.shuffle(order)
            for name, executor in order:
                rates[name].append(one_round(executor))

    table = table_class(
        f"Cluster throughput: {len(documents)} documents through a local Dask cluster of {WORKERS} workers",
        "no sandbox", unit="docs/s",
        note=(f"Documents per second (higher is better): median of {rounds} rounds, and the rate 90% of the "
              "rounds reached (p90); the ratio is the "
              f"share of the unsandboxed rate kept. {WORKERS} worker processes x {THREADS_PER_WORKER} threads, "
              "TCP on 127.0.0.1; every sandboxed task is a fresh sandbox (the demo's good-plugin limits: "
              "256 MiB, 32 processes, 20 s)."))
    for name, values in rates.items():
        ordered = sorted(values)
        table.add(name, {"n": len(values), "median_docs/s": statistics.median(values),
                         "p90_docs/s": ordered[max(0, int(len(ordered) * 0.1) - 1)] if ordered else None,
                         "ms_per_doc": 1000 / statistics.median(values) * WORKERS * THREADS_PER_WORKER})
    return [table]
