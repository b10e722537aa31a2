"""`python -m tracedoffload`: the `tracedoffload` command."""

import sys

from tracedoffload.cli import main

sys.exit(main())
