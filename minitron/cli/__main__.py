"""``python -m minitron.cli ...``: the ``minitron`` console script."""

from . import main

raise SystemExit(main())
