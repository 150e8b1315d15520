"""The Python examples of the README and of the site under docs/ run as written (they are hardware examples).

A block that defines ``test_`` functions is a pytest file: it runs under pytest
in a subprocess, with no conftest, as a user's would. Every other block runs
with ``exec``. The README's commands and its links into the site are checked
too: the links must name pages that exist.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("**/*.md")), *sorted((ROOT / "docs").glob("**/*.rst"))]
PAGES = [page for page in PAGES if "_build" not in page.parts]


def examples(page: Path) -> list[str]:
    """The page's Python blocks: Markdown fences, or reStructuredText ``code-block:: python`` directives."""
    text = page.read_text()
    if page.suffix == ".md":
        return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    return [re.sub(r"(?m)^   ", "", block) for block in
            re.findall(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text, re.M)]


EXAMPLES = [(page, source) for page in PAGES for source in examples(page)]
SCRIPTS = [(page, source) for page, source in EXAMPLES if not re.search(r"^def test_", source, re.M)]
TEST_FILES = [(page, source) for page, source in EXAMPLES if re.search(r"^def test_", source, re.M)]


def example_ids(found: list[tuple[Path, str]]) -> list[str]:
    counts: dict[Path, int] = {}
    ids = []
    for page, _ in found:
        counts[page] = counts.get(page, 0) + 1
        ids.append(f"{page.relative_to(ROOT)}:{counts[page]}")
    return ids


@pytest.mark.host_independent
def test_the_readme_and_the_site_have_examples():
    readme = [source for page, source in EXAMPLES if page == README]
    assert len(readme) >= 1
    assert len(SCRIPTS) >= 4 and len(TEST_FILES) >= 1
    assert any("handlers=" in source for _, source in SCRIPTS)       # the custom guest of the tutorial


@pytest.mark.parametrize("page, source", SCRIPTS, ids=example_ids(SCRIPTS))
def test_example_runs(kvm_available, page, source):
    exec(compile(source, str(page), "exec"), {})


@pytest.mark.parametrize("page, source", TEST_FILES, ids=example_ids(TEST_FILES))
def test_example_test_file_passes_under_pytest(kvm_available, tmp_path, page, source):
    (tmp_path / "test_docs_example.py").write_text(source)
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_docs_example.py"], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"pykvm hardware tests: [1-9]\d* passed, 0 failed, 0 skipped", result.stdout)


@pytest.mark.host_independent
def test_the_readmes_links_into_the_site_name_pages_that_exist():
    links = re.findall(r"\]\(((?:docs/)[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert len(links) >= 5
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


@pytest.mark.host_independent
def test_the_readme_stays_a_readme():
    # At most 150 lines: what pykvm is, the two commands, an example, the commands and links; the rest is the site.
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for needed in ("host_independent", "kvm_unit_tests", "`qemu`", "`hardware`", "assert_delivered",
                   "## kvm-unit-tests parity", '-m "hardware and not host_independent"'):
        assert needed in text, needed
