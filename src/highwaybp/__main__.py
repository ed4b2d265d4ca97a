import sys

from highwaybp.cli import main

sys.exit(main())
