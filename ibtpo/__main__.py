"""``python -m ibtpo``: the ``ibtpo`` command without its console script."""
import sys

from ibtpo.cli import main

sys.exit(main())
