import pytest

import flowbench
from flowbench import FlowbenchError
from flowbench.flows import registry


def test_registry_lists_the_built_in_flows_in_order_of_publication():
    assert flowbench.list_models() == [
        "realnvp",
        "glow",
        "emerging",
        "periodic",
        "convexp",
        "me_woodbury",
        "woodbury",
        "cinc",
        "nxn_shift",
        "butterfly",
        "finc",
    ]


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(FlowbenchError, match="unknown model 'glwo': did you mean 'glow'"):
        flowbench.build_model("glwo", (3, 32, 32))


def test_unknown_hyperparameter_names_what_is_accepted():
    with pytest.raises(FlowbenchError, match="no hyperparameter 'widht'.*hidden_channels"):
        flowbench.build_model("glow", (3, 32, 32), widht=3)


def test_image_too_small_for_the_levels_is_a_clear_error():
    with pytest.raises(FlowbenchError, match="cannot build 'glow' for images \\(3, 8, 8\\)"):
        flowbench.build_model("glow", (3, 8, 8), levels=4)


def test_a_plugin_that_cannot_be_imported_is_a_one_line_error(monkeypatch, isolated_registry, tmp_path):
    monkeypatch.setenv("FLOWBENCH_PLUGINS", f"{tmp_path / 'missing.py'}")
    with pytest.raises(FlowbenchError, match=r"FLOWBENCH_PLUGINS: cannot import '.*missing.py' \(no file"):
        flowbench.list_models()
    monkeypatch.setenv("FLOWBENCH_PLUGINS", "no_such_flow_module")
    with pytest.raises(FlowbenchError, match="cannot import 'no_such_flow_module'.*module names or .py file paths"):
        flowbench.list_models()


def test_a_name_registered_by_two_modules_is_refused(monkeypatch, isolated_registry, tmp_path):
    plugin = tmp_path / "second_glow.py"
    plugin.write_text(
        "from flowbench.flows import register_model\n\n"
        "@register_model('glow', paper='x', code='y')\ndef build(image_shape):\n    pass\n"
    )
    monkeypatch.setenv("FLOWBENCH_PLUGINS", str(plugin))
    with pytest.raises(
        FlowbenchError,
        match="model 'glow' is registered by both flowbench.flows.glow and flowbench_plugin_second_glow: rename one",
    ):
        flowbench.list_models()


def test_plugin_paths_reach_ray_workers_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWBENCH_PLUGINS", "flows/mine.py, some.module")
    assert registry.plugin_env_vars() == {"FLOWBENCH_PLUGINS": f"{tmp_path / 'flows/mine.py'},some.module"}
    monkeypatch.delenv("FLOWBENCH_PLUGINS")
    assert registry.plugin_env_vars() == {}
