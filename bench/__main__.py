import os
import sys

if not __package__:  # run as `python3 path/to/bench` rather than `python3 -m bench`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.run import main  # noqa: E402

sys.exit(main())
