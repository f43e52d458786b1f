"""``python -m flowbench.cli``: the ``flowbench`` command."""

import sys

from flowbench.cli import main

sys.exit(main())
