"""`python -m tools.rabbit_bench`: see the package's docstring."""

import sys

from tools.rabbit_bench.cli import main

sys.exit(main())
