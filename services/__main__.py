"""`python -m services` is the same as the `async-data-processor` console script."""

from services.cli import main

raise SystemExit(main())
