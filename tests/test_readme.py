"""The READMEs' result tables are the committed results JSONs, rendered.

Every results file written by the one-protocol harness (its header has a
``protocol``) must appear in README.md or benchmarks/README.md exactly as the
bench's report renders it, so a re-run that is committed without its tables,
or a table edited by hand, fails here.
"""

import json
from pathlib import Path

import pytest

from avl_genreplay.bench.report import markdown_table, replay_quality_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _protocol_results():
    files = []
    for path in sorted(RESULTS.glob("*.json")):
        if "protocol" in json.loads(path.read_text()):
            files.append(path)
    return files


def _readmes() -> str:
    return (ROOT / "README.md").read_text() + (
        ROOT / "benchmarks" / "README.md"
    ).read_text()


@pytest.mark.parametrize("path", _protocol_results(), ids=lambda p: p.name)
def test_readme_tables_equal_committed_results(path):
    results = json.loads(path.read_text())
    assert results["complete"], f"{path.name} is a partial run"
    readmes = _readmes()
    table = markdown_table(results["strategies"])
    if path.name == "splitmnist_class_il.json":  # the headline: plain SplitMNIST
        assert results["protocol"]["name"] == "plain"
        assert table in (ROOT / "README.md").read_text()
    assert table in readmes, f"the results table of {path.name} is not in a README"
    quality = replay_quality_table(results["strategies"])
    assert quality in readmes, f"the replay-quality table of {path.name} is missing"
