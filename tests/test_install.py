"""Issue 17: a fresh install works on the first try.

What pip installs for each extra alone, and that the servers of that extra start from the
built wheel, is checked by .ci/wheel-check (a fresh venv per extra; CI runs it). Here: what
the extras declare, and that each package imports with only its own extra's dependencies.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_gevent_extra_brings_what_gunicorns_gevent_worker_imports() -> None:
    """gunicorn 27's gevent worker imports `packaging`, which gunicorn declares only in its own
    gevent extra: ours must ask for gunicorn[gevent], not gunicorn and gevent."""
    assert any(req.replace(" ", "").startswith("gunicorn[gevent]") for req in EXTRAS["gevent"]), \
        EXTRAS["gevent"]


def test_fast_extra_brings_gunicorns_c_parser_and_the_suite_runs_with_it() -> None:
    assert any(req.startswith("gunicorn_h1c") for req in EXTRAS["fast"]), EXTRAS["fast"]
    assert any("fast" in req for req in EXTRAS["test"] if req.startswith("graceful-close[")), \
        EXTRAS["test"]


def test_uvicorn_package_imports_without_httptools() -> None:
    """The zttp extra alone has no httptools: graceful_close.uvicorn (and so ZttpProtocol) must
    import without it, and HttpToolsProtocol then says what to install."""
    code = (
        "import sys\n"
        "sys.modules['httptools'] = None  # as if not installed\n"
        "import graceful_close.uvicorn as u\n"
        "assert u.AutoHTTPProtocol is u.H11Protocol\n"
        "try:\n"
        "    u.HttpToolsProtocol\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'pip install "graceful-close[uvicorn]"' in done.stdout, done.stdout


def test_one_configure_import_everywhere() -> None:
    """Issue 17 item 14: the README, the recipes and the docstrings import configure one way:
    `from graceful_close import configure`."""
    places = [REPO / "README.md", *sorted((REPO / "integrations").glob("*.py")),
              *sorted((REPO / "graceful_close").rglob("*.py"))]
    found = []
    for path in places:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bimport\b.*\bconfigure\b|\bconfigure\b.*\bimport\b", line) and \
                    "from graceful_close import configure" not in line and \
                    not line.lstrip().startswith(("from .", "from ..")):  # the package's own imports
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
    recipes = [path for path in (REPO / "integrations").glob("*.conf.py")]
    assert recipes and all("from graceful_close import configure" in path.read_text()
                           for path in recipes)


def test_readme_starts_with_the_two_commands_and_says_what_full_coverage_needs() -> None:
    """Issue 17 item 3: the test command needs nginx and apache2 for full coverage (only .ci/run
    installs them; without them the real-server probe tests skip): said next to it."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(block) == 2, block
    assert block[0].endswith('pip install -e ".[all]" && graceful-close demo'), block[0]
    assert block[1].endswith("python -m pytest") and '".[test]"' in block[1], block[1]
    first_paragraphs = readme.split("```", 2)[2].split("\n\n", 2)[1]
    assert "nginx" in first_paragraphs and "apache2" in first_paragraphs, first_paragraphs
    assert "skip" in first_paragraphs
