"""measurements.json: what was measured of a draft, per device type, beside its config.json."""
import json

import pytest

from vllm_chimera.checkpoint import SHIPPED_DRAFTS, load_config, load_draft, save_draft
from vllm_chimera.config import ChimeraConfig
from vllm_chimera.measurements import (MEASUREMENTS_NAME, DeviceMeasurements, load_measurements,
                                       save_measurements)

from conftest import build_random_draft

TREE = dict(head_top_k_accuracies=[[0.4, 0.2], [0.3, 0.1]],
            tree_step_seconds={"1": 0.03, "4": 0.033}, tree_schedule=[[1, 1, 4], [2, 8, 0]])


@pytest.fixture
def draft_dir(tiny_target, tmp_path):
    save_draft(build_random_draft(tiny_target, num_heads=3), tmp_path / "draft")
    return tmp_path / "draft"


def test_measurements_round_trip_beside_the_design(draft_dir):
    design = (draft_dir / "config.json").read_text()
    assert load_measurements(draft_dir) == {}  # nothing measured yet
    save_measurements(draft_dir, "cpu", step_aside_schedule=[[1, 1, 3], [2, 64, 0]])
    save_measurements(draft_dir, "cpu", **TREE)  # another command: the schedule stays
    save_measurements(draft_dir, "cuda", step_aside_schedule=[[1, 16, 3]])
    assert load_measurements(draft_dir) == {
        "cpu": DeviceMeasurements(step_aside_schedule=[[1, 1, 3], [2, 64, 0]], **TREE),
        "cuda": DeviceMeasurements(step_aside_schedule=[[1, 16, 3]])}
    assert json.loads((draft_dir / MEASUREMENTS_NAME).read_text())["cuda"] == {
        "step_aside_schedule": [[1, 16, 3]]}
    assert (draft_dir / "config.json").read_text() == design  # the design is not touched
    load_draft(draft_dir)  # ... and still loads


def test_new_weights_forget_the_old_measurements(draft_dir):
    save_measurements(draft_dir, "cpu", step_aside_schedule=[[1, 1, 3]])
    save_draft(load_draft(draft_dir), draft_dir)
    assert load_measurements(draft_dir) == {} and not (draft_dir / MEASUREMENTS_NAME).exists()


def test_config_json_never_holds_a_measured_field(draft_dir):
    """Whoever sets one on the config (older code did), config.json stays the design."""
    config = load_config(draft_dir)
    config.step_aside_schedules = {"cpu": [[1, 1, 3]]}
    config.save_pretrained(draft_dir)
    saved = json.loads((draft_dir / "config.json").read_text())
    assert not set(saved) & set(ChimeraConfig.MEASURED_FIELDS)


def test_an_older_config_json_with_measurements_loads_and_they_move_out(draft_dir):
    config = json.loads((draft_dir / "config.json").read_text())
    config.update(step_aside_schedules={"cpu": [[1, 1, 3], [2, 4, 0]]}, tree_schedules=None,
                  head_top_k_accuracies=TREE["head_top_k_accuracies"],
                  tree_step_seconds={"cpu": TREE["tree_step_seconds"]})
    (draft_dir / "config.json").write_text(json.dumps(config))
    loaded = load_draft(draft_dir).config  # no error, and not part of the design
    assert not any(hasattr(loaded, name) for name in ChimeraConfig.MEASURED_FIELDS)
    expected = DeviceMeasurements(step_aside_schedule=[[1, 1, 3], [2, 4, 0]],
                                  head_top_k_accuracies=TREE["head_top_k_accuracies"],
                                  tree_step_seconds=TREE["tree_step_seconds"])
    assert load_measurements(draft_dir) == {"cpu": expected}
    # The next measuring command moves them: into measurements.json, out of config.json.
    save_measurements(draft_dir, "cuda", step_aside_schedule=[[1, 8, 2]])
    assert not set(json.loads((draft_dir / "config.json").read_text())) & set(ChimeraConfig.MEASURED_FIELDS)
    assert load_measurements(draft_dir)["cpu"] == expected


def test_the_shipped_draft_keeps_its_cpu_schedule_beside_its_design():
    folder = SHIPPED_DRAFTS["smollm2"]
    assert not set(json.loads((folder / "config.json").read_text())) & set(ChimeraConfig.MEASURED_FIELDS)
    assert load_measurements(folder)["cpu"].step_aside_schedule == [[1, 1, 4], [2, 3, 1], [4, 4, 0]]


@pytest.mark.parametrize("schedule, message", [
    ([[2, 4, 1]], "start at 1"),
    ([[1, 4, 1], [3, 8, 0]], "overlap"),
    ([[1, 4, 9]], r"K must be in 0\.\.3"),
    ([[1, 4]], r"\[start, end, K\]"),
    ([], "non-empty"),
])
def test_bad_step_aside_schedule_is_refused_before_writing(draft_dir, schedule, message):
    with pytest.raises(ValueError, match=r"step_aside_schedule: .*" + message):
        save_measurements(draft_dir, "cpu", step_aside_schedule=schedule)
    assert not (draft_dir / MEASUREMENTS_NAME).exists()


def test_a_bad_measurements_file_is_a_clear_error(draft_dir):
    (draft_dir / MEASUREMENTS_NAME).write_text(json.dumps({"cpu": {"step_aside_schedul": [[1, 1, 1]]}}))
    with pytest.raises(ValueError, match="measurements.json: 'cpu' must map some of"):
        load_measurements(draft_dir)
    (draft_dir / MEASUREMENTS_NAME).write_text(json.dumps({"cpu": {"tree_step_seconds": {"1": -1}}}))
    with pytest.raises(ValueError, match="tree_step_seconds must map"):
        load_measurements(draft_dir)
