import sys

from rotary.cli import main

sys.exit(main())
