"""Each usage example runs (briefly) on real data."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "example, own_arguments",
    [
        ("dgr_splitmnist", []),
        ("ddgr_splitmnist", ["--samples-per-class", "8"]),
        ("dgm_splitmnist", ["--variant", "a"]),
    ],
)
def test_example_trains_and_evaluates(example, own_arguments, data_root):
    results = _load(example).main(
        [
            "--data-root",
            str(data_root),
            "--experiences",
            "2",
            "--generator-iterations",
            "5",
            "--train-subset",
            "256",
            *own_arguments,
        ]
    )
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 < accuracy <= 1.0
