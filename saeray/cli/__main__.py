"""`python -m saeray.cli ...`: the same as the `saeray` command."""

from . import main

raise SystemExit(main())
