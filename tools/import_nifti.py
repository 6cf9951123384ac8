"""``python -m tools.import_nifti``: folders of NIfTI scans (+ label maps, landmarks) -> an ldr-tf dataset.

The library is `ldr_tf.data.importer` (its docstring describes the format and every decision); the flags are in
`flags.import_flags`.
"""

import sys

from ldr_tf.data.importer import run

if __name__ == "__main__":
    sys.exit(run(sys.argv))
