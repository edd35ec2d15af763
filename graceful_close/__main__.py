"""`python -m graceful_close`: the same command line as the `graceful-close` script.

Only `python -m` runs this module: importing graceful_close imports none of the
diagnostics or their dependencies.
"""

import sys

from .diagnostics.cli import main

sys.exit(main())
