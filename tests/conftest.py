import os
import sys

# helpers.py sits beside the tests; make it importable however pytest is run.
sys.path.insert(0, os.path.dirname(__file__))
