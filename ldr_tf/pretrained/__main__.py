"""``python -m ldr_tf.pretrained``: the pretrained models of this installation and their model cards."""

import sys

from ldr_tf.pretrained import main

sys.exit(main())
