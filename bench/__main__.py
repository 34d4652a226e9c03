"""`python -m bench`: see bench.main."""
import sys

from . import main

sys.exit(main())
