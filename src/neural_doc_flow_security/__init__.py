"""neural-doc-flow security: the process sandbox for untrusted document plugins."""
