"""``python -m rt2_ros.fleet``: the same as ``rt2-fleet-serve``."""

import sys

from rt2_ros.fleet.front import main

sys.exit(main())
