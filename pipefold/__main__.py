"""`python -m pipefold …` is the same as the `pipefold` command."""

from pipefold.cli.main import main

raise SystemExit(main())
