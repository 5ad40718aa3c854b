"""``python -m erasure``: see ``erasure/cli.py``."""

from .cli import main

raise SystemExit(main())
