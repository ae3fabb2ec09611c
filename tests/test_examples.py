"""Each usage example runs (briefly) on real data."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dgr_example_trains_and_evaluates(data_root):
    results = _load("dgr_splitmnist").main(
        [
            "--data-root",
            str(data_root),
            "--experiences",
            "2",
            "--generator-iterations",
            "5",
            "--train-subset",
            "256",
        ]
    )
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 < accuracy <= 1.0


def test_ddgr_example_trains_and_evaluates(data_root):
    results = _load("ddgr_splitmnist").main(
        [
            "--data-root",
            str(data_root),
            "--experiences",
            "2",
            "--generator-iterations",
            "5",
            "--samples-per-class",
            "8",
            "--train-subset",
            "256",
        ]
    )
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 < accuracy <= 1.0


def test_dgm_example_trains_and_evaluates(data_root):
    results = _load("dgm_splitmnist").main(
        [
            "--data-root",
            str(data_root),
            "--variant",
            "a",
            "--experiences",
            "2",
            "--generator-iterations",
            "5",
            "--train-subset",
            "256",
        ]
    )
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 < accuracy <= 1.0
