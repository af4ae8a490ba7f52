"""``python -m tigress_signal``: the same as the ``tigress-signal`` command."""

import sys

from tigress_signal.cli import main

sys.exit(main())
