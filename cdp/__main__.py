"""``python -m cdp``: the same as the ``cdp`` console script (used by subprocess tests)."""

from cdp.cli.main import main

raise SystemExit(main())
