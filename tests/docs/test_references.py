"""Every test that README.md and docs/ name exists: a page that cites ``test_x.py::test_y`` as the check of a promise
must not outlive the test (renamed or merged tests are the usual way such a reference goes stale)."""

from __future__ import annotations

import re

from tests.helpers import docs as doc_helpers

TEST_REFERENCE = re.compile(r"((?:[\w.-]+/)*test_\w+\.py)(?:::(test_\w+))?")
TESTS = doc_helpers.ROOT / "tests"


def cited_tests() -> list[tuple[str, str, str | None]]:
    """(page, test file as written, test function or None) of every test a page names."""
    return [
        (str(page.relative_to(doc_helpers.ROOT)), match[1], match[2])
        for page in doc_helpers.pages()
        for match in TEST_REFERENCE.finditer(page.read_text(encoding="utf-8"))
    ]


def missing(path: str, function: str | None) -> str | None:
    """Why the reference does not resolve, or None: some file under tests/ ending in ``path`` defines ``function``."""
    suffix = path.removeprefix("tests/")
    files = [f for f in TESTS.rglob(suffix.rsplit("/", 1)[-1]) if f.relative_to(TESTS).as_posix().endswith(suffix)]
    if not files:
        return f"no file tests/**/{suffix}"
    if function is not None and not any(re.search(rf"^def {function}\(", f.read_text(), re.M) for f in files):
        return f"no test {function} in {', '.join(str(f.relative_to(doc_helpers.ROOT)) for f in files)}"
    return None


def test_every_test_named_in_the_docs_exists():
    references = cited_tests()
    assert len(references) > 20  # reliability.md names the test of each fault
    problems = [f"{page}: {path}{'::' + function if function else ''}: {why}"
                for page, path, function in references if (why := missing(path, function))]
    assert problems == []


def test_a_stale_reference_is_found():
    assert missing("tests/pipeline/precompute/test_driver.py", "test_no_such_test") is not None
    assert missing("test_no_such_module.py", None) == "no file tests/**/test_no_such_module.py"
    assert missing("test_references.py", "test_a_stale_reference_is_found") is None
