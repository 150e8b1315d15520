"""Reference solutions of the labs (pykvm/labs), and wrong ones the checkers must fail.

Kept with the tests, never in the package: ``python -m pykvm.labs start`` hands out
only the starter. ``labNN.py`` is the reference; ``labNN_wrong_*.py`` a plausible mistake.
"""
