"""python -m netmon: the same as the `netmon` command."""
import sys

from .cli import main

sys.exit(main())
