"""`python -m gsmtp ...`: the same command as `gsmtp ...`."""

import sys

from gsmtp.cli import main

sys.exit(main())
