"""The README's Python examples run as written (they are hardware examples).

A block that defines ``test_`` functions is a pytest file: it runs under pytest
in a subprocess, with no conftest, as a user's would. Every other block runs
with ``exec``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
SCRIPTS = [source for source in EXAMPLES if not re.search(r"^def test_", source, re.M)]
TEST_FILES = [source for source in EXAMPLES if re.search(r"^def test_", source, re.M)]


def test_the_readme_has_examples():
    assert len(SCRIPTS) >= 3 and len(TEST_FILES) >= 1
    assert any("handlers=" in source for source in SCRIPTS)       # the custom guest


@pytest.mark.parametrize("source", SCRIPTS, ids=[f"example{i}" for i in range(len(SCRIPTS))])
def test_readme_example_runs(kvm_available, source):
    exec(compile(source, str(README), "exec"), {})


@pytest.mark.parametrize("source", TEST_FILES, ids=[f"testfile{i}" for i in range(len(TEST_FILES))])
def test_readme_test_file_passes_under_pytest(kvm_available, tmp_path, source):
    (tmp_path / "test_readme_example.py").write_text(source)
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_readme_example.py"], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"pykvm hardware tests: [1-9]\d* passed, 0 failed, 0 skipped", result.stdout)
