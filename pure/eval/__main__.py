import sys

from pure.eval.cli import main

sys.exit(main())
