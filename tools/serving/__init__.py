"""Serving an exported ldr-tf model with TensorFlow Serving: config files, a client, and a test double server."""
