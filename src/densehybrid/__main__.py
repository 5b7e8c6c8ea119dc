"""``python -m densehybrid COMMAND`` (what ``torchrun ... -m densehybrid train`` runs)."""

import sys

from densehybrid.cli import main

if __name__ == "__main__":
    sys.exit(main())
