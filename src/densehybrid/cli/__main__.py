import sys

from densehybrid.cli import main

sys.exit(main())
