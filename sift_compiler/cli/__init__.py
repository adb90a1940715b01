"""Command-line tools: sift-compile, sift-bench, sift-check."""
