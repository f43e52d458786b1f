import pytest

import flowbench
from flowbench import FlowbenchError


def test_registry_lists_the_table2_models_and_periodic():
    assert set(flowbench.list_models()) == {"realnvp", "glow", "emerging", "nxn_shift", "periodic"}


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(FlowbenchError, match="unknown model 'glwo': did you mean 'glow'"):
        flowbench.build_model("glwo", (3, 32, 32))


def test_unknown_hyperparameter_names_what_is_accepted():
    with pytest.raises(FlowbenchError, match="no hyperparameter 'widht'.*hidden_channels"):
        flowbench.build_model("glow", (3, 32, 32), widht=3)


def test_image_too_small_for_the_levels_is_a_clear_error():
    with pytest.raises(FlowbenchError, match="cannot build 'glow' for images \\(3, 8, 8\\)"):
        flowbench.build_model("glow", (3, 8, 8), levels=4)
