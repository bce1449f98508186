"""``python -m rlhfkit.annotate <command>``: the same as ``rlhfkit annotate <command>``."""

import sys

from rlhfkit.annotate.cli import main

raise SystemExit(main(sys.argv[1:]))
