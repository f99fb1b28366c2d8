"""`python -m vaehelpers` runs the command line."""

from vaehelpers.cli import main

raise SystemExit(main())
