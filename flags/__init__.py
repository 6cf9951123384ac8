"""absl flag definitions for the ldr-tf command-line tools.

Import as ``from flags import train_flags`` and absl's module as ``from absl import flags``; never ``import flags``.
"""
