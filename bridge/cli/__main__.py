"""``python -m bridge.cli``: the same as ``enclave``."""

import sys

from . import main

sys.exit(main())
