"""Reference solutions of the labs (pykvm/labs), and wrong ones the checkers must fail.

Kept with the tests, never in the package: ``python -m pykvm.labs start`` hands out
only the starter. ``labNN.py`` is the reference; ``labNN_wrong_*.py`` a plausible
mistake, written as a change to the reference: only the definitions it replaces (and
the imports they need), plus ``EXPECTED_FAILURES``. ``tests/test_labs.py`` appends it
to the reference and checks the result as the student's ``lab.py``.
"""
