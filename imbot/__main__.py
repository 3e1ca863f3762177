"""``python -m imbot …``: the ``imbot`` command, as the dev stack spawns its services."""

from imbot.cli.main import main

raise SystemExit(main())
