"""The user-facing LiDAR-PTQ config: stage switches at the top, expert knobs in sub-configs that a recipe
file writes as nested dicts and the command line as dotted keys."""
import json

import pytest

from lidar_ptq.errors import RecipeError
from lidar_ptq.lidar import EqualizeOptions, LidarPTQConfig, RangeSearchOptions, ReconstructionOptions, TGPLConfig
from lidar_ptq.lidar.recipes import load_recipe, resolve_recipe


def test_a_recipe_dict_builds_the_recipe_its_config_builds():
    spec = {"method": "lidar_ptq", "w_bits": 4, "calib_frames": 12, "bias_correction": True, "tgpl": True,
            "equalize": {"patterns": ["backbone.*"], "alpha": 0.5},
            "ranges": {"rules": ["maxmin", "lp3"], "frames": 4},
            "task_loss": {"top_k": 50, "score_threshold": 0.2},
            "recon": {"frames": 6, "iterations": 30, "batch_size": 2}}
    config = LidarPTQConfig(w_bits=4, calib_frames=12, bias_correction=True, tgpl=True,
                            equalize=EqualizeOptions(("backbone.*",), 0.5),
                            ranges=RangeSearchOptions(("maxmin", "lp3"), 4),
                            task_loss=TGPLConfig(top_k=50, score_threshold=0.2),
                            recon=ReconstructionOptions(6, {"iterations": 30, "batch_size": 2}))
    from_dict, from_config = load_recipe(spec), config.recipe()
    assert (from_dict.equalize, from_dict.equalize_alpha) == (("backbone.*",), 0.5) == \
        (from_config.equalize, from_config.equalize_alpha)
    assert list(from_dict.range_candidates) == ["maxmin", "lp3"] == list(from_config.range_candidates)
    assert (from_dict.search_frames, from_dict.recon_frames) == (4, 6) == \
        (from_config.search_frames, from_config.recon_frames)
    assert from_dict.recon.iterations == 30 == from_config.recon.iterations
    assert from_dict.select_loss.cfg.top_k == 50 == from_config.select_loss.cfg.top_k
    assert from_dict.recon.output_loss.cfg == TGPLConfig(top_k=50, score_threshold=0.2)


def test_dotted_options_reach_into_sub_configs():
    recipe = resolve_recipe({"method": "lidar_ptq"}, options={"ranges.frames": 3, "recon.frames": 2,
                                                              "recon.iterations": 7, "equalize.alpha": 0.6})
    assert (recipe.search_frames, recipe.recon_frames, recipe.recon.iterations, recipe.equalize_alpha) == \
        (3, 2, 7, 0.6)
    assert recipe.source["ranges"] == {"frames": 3}


def test_baselines_share_the_equalize_and_recon_keys():
    recipe = load_recipe({"method": "qdrop", "equalize_inputs": True, "equalize": {"alpha": 0.5},
                          "recon": {"frames": 4, "iterations": 9}})
    assert (recipe.equalize, recipe.equalize_alpha) == (("*voxel_encoder*",), 0.5)
    assert (recipe.recon_frames, recipe.recon.iterations) == (4, 9)
    assert load_recipe({"method": "percentile", "equalize": {"alpha": 0.5}}).equalize == ()  # switch is off


@pytest.mark.parametrize("spec, message", [
    ({"ranges": {"frame": 8}}, r"unknown key\(s\) \['frame'\] in 'ranges'.*valid: \['frames', 'rules'\]"),
    ({"equalize": ["*voxel_encoder*"]}, r"'equalize' in the PTQ recipe must be a dict of EqualizeOptions"),
    ({"recon": {"iteration": 5}}, r"unknown reconstruction key\(s\) \['iteration'\]"),
    ({"task_loss": {"topk": 5}}, r"unknown key\(s\) \['topk'\] in 'task_loss'"),
    ({"search_frames": 8}, r"search_frames is now ranges.frames"),
    ({"range_rules": ["maxmin"], "recon_frames": 4}, r"range_rules is now ranges.rules; recon_frames is now "
                                                     r"recon.frames"),
    ({"method": "maxmin", "equalize_alpha": 0.5}, r"equalize_alpha is now equalize.alpha"),
])
def test_misplaced_or_unknown_sub_config_keys_name_the_fix(spec, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"method": "lidar_ptq", **spec})


def test_a_shipped_recipe_file_round_trips_through_json(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"method": "lidar_ptq", "ranges": {"rules": ["maxmin"], "frames": 2}}))
    recipe = load_recipe(path)
    assert list(recipe.range_candidates) == ["maxmin"] and recipe.search_frames == 2
