"""`python -m flashjit ...` runs the flashjit command (see flashjit.cli)."""

import sys

from .cli import main

sys.exit(main())
