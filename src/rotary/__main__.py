import sys

from rotary.lab.cli import main

sys.exit(main())
