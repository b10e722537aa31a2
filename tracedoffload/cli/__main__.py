"""`python -m tracedoffload.cli`: the `tracedoffload` command."""

import sys

from tracedoffload.cli import main

sys.exit(main())
