"""Lab 1 with a fake checker beside it: pykvm/labs/child.py in the student's folder reports every step passed.

The real checker must run instead (nothing of the student's folder is on its path), and find no solve().
"""

LAB = 1
EXPECTED_FAILURES = [(1, "defines no function solve()")]
