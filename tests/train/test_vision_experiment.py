"""`highwaybp experiment vision` runs end to end (tiny), skips finished runs on a rerun and
refuses a rerun with another configuration into the same folder."""

from __future__ import annotations

import json

import pytest

from highwaybp.cli import main
from highwaybp.models.torchvision import ResNetStage
from highwaybp.train import vision_experiment as ve


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    assert main(["experiment", "vision", "--tiny", "--quiet", "--out", str(out)]) == 0
    return out


def test_tiny_end_to_end(tiny_out):
    results = json.loads((tiny_out / "vision_results.json").read_text())
    task = results["tasks"]["resnet18_seed0"]
    assert task["metric"] == "test_acc" and task["config"]["L"] == 8
    assert set(task["runs"]) == {"exact", "highway_k0", "highway_k1", "fixedpoint_k1"}
    exact = task["runs"]["exact"]
    assert [c["fraction"] for c in exact["checkpoints"]][::len(exact["checkpoints"]) - 1] == [
        0.0, 1.0]
    for c in exact["checkpoints"]:
        assert set(c["cosines"]) == {"highway_k0", "highway_k1", "fixedpoint_k0", "fixedpoint_k1"}
        # Untrained-to-barely-trained net, 8 blocks: k <= 1 is far from exact.
        assert all(v["cosine"] < 0.999 for v in c["cosines"].values())
    for run in task["runs"].values():
        assert len(run["history"]) == task["config"]["steps"]
    table = (tiny_out / "table.md").read_text()
    assert "| highway_k1 |" in table and "Fig. 6" in table
    pytest.importorskip("matplotlib")
    for name in ("vision_final_vs_k.png", "vision_fig6_cosine.png", "vision_training_curves.png"):
        assert (tiny_out / name).stat().st_size > 0


def test_rerun_skips_finished_runs(tiny_out):
    before = json.loads((tiny_out / "vision_results.json").read_text())
    assert main(["experiment", "vision", "--tiny", "--quiet", "--out", str(tiny_out)]) == 0
    after = json.loads((tiny_out / "vision_results.json").read_text())
    assert after["tasks"] == before["tasks"]  # nothing retrained


def test_rerun_with_another_configuration_is_refused(tiny_out, capsys):
    capsys.readouterr()
    code = main(["experiment", "vision", "--tiny", "--quiet", "--lr", "0.5", "--out",
                 str(tiny_out)])
    err = capsys.readouterr().err
    assert code == 2 and "another configuration" in err and "lr" in err


def test_model_is_adapted_torchvision_resnet18():
    model = ve.SmallResNet18((4, 4, 4, 4))
    assert not isinstance(model.layer1, ResNetStage)
    task_model = ve.vision_task(_args(), 0).make_model()
    assert isinstance(task_model.layer1, ResNetStage)
    assert list(task_model.state_dict()) == list(model.state_dict())


def _args():
    from highwaybp.cli import build_parser

    args = build_parser().parse_args(["experiment", "vision", "--tiny"])
    ve.apply_tiny(args)
    return args
