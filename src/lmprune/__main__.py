"""`python -m lmprune …` (and `torchrun -m lmprune …`): the command line."""

import sys

from .cli import main

sys.exit(main())
