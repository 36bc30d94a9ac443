"""`python -m rabbitllm.cli`: the same as the `rabbit` script (useful where scripts are not on
PATH)."""

import sys

from rabbitllm.cli.app import main

sys.exit(main())
