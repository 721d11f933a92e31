"""``python -m fastorch``: the same as the ``fastorch`` command."""

import sys

from fastorch.cli import main

sys.exit(main())
