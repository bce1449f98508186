"""``python -m rlhfkit.cli COMMAND`` (what ``accelerate launch -m rlhfkit.cli`` and ``torchrun -m`` run)."""

import sys

from rlhfkit.cli import main

sys.exit(main())
