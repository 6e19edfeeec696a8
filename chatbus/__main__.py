import sys

from chatbus.cli import main

sys.exit(main())
