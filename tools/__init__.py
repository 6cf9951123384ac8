"""One-off scripts: dataset conversion, serving client, figure making (run as ``python -m tools.<name>``)."""
