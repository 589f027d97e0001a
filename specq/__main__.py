"""python -m specq: the specq command line."""
import sys

from .cli import main

sys.exit(main())
