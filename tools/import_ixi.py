"""``python -m tools.import_ixi``: the 150 IXI T1 scans + DLMUSE label maps -> ``brain.json`` + ``brain.h5``.

The library is `ldr_tf.data.ixi` (its docstring describes the split, the preprocessing and the atlas choices); the
flags are in `flags.import_flags`.
"""

import sys
import time

from ldr_tf.data.ixi import run

if __name__ == "__main__":
    t = time.time()
    status = run(sys.argv)
    print(f"import_ixi: {time.time() - t:.1f} s wall", file=sys.stderr)
    sys.exit(status)
