"""`python -m norm_fast`: the backend report (see norm_fast/info.py)."""
import sys

from .info import main

sys.exit(main())
