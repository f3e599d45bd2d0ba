"""`python -m lcsm_compile`: the `lcsm-compile` command line."""

import sys

from lcsm_compile.tools.cli import main

sys.exit(main())
