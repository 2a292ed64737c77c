"""python -m training: the acs-train CLI."""

import sys

from .cli import main

sys.exit(main())
