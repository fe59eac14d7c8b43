"""`python -m train.cli COMMAND ...`: any subcommand, e.g. under `accelerate launch -m train.cli cache CONFIG`."""

import sys

from train.cli import main

sys.exit(main())
