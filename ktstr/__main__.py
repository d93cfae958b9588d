import sys

from ktstr.cli import main

sys.exit(main())
