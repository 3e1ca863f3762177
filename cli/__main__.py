"""``python -m cli …``: the ``imbot`` command, as the dev stack spawns its services."""

import sys

from cli.main import main

sys.exit(main())
