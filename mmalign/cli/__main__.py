"""`python -m mmalign.cli ...` runs the command line."""

import sys

from mmalign.cli import main

sys.exit(main())
