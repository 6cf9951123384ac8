"""One-command recipes that chain the tools for a dataset (``python -m ldr_tf.recipes.<name>``)."""
