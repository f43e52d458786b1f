import pytest

import flowbench
from flowbench import FlowbenchError
from flowbench.cards import load_card
from flowbench.flows.registry import model_entry

TABLE2 = {  # the paper's Table 2 (DESIGN.md)
    "realnvp": (3.49, 4.28, 3.98),
    "glow": (3.35, 4.09, 3.81),
    "emerging": (3.34, 4.09, 3.81),
    "nxn_shift": (3.50, 3.96, 3.74),
}


@pytest.mark.parametrize("name", flowbench.list_models())
def test_every_model_has_a_card_whose_hparams_the_builder_accepts(name):
    card = load_card(name)
    accepted = model_entry(name).hparams()
    for dataset, entry in card.datasets.items():
        assert set(entry.hparams) <= set(accepted), (name, dataset)


@pytest.mark.parametrize("name", sorted(TABLE2))
def test_cards_hold_table2(name):
    card = load_card(name)
    got = tuple(card.paper_bpd(d) for d in ("cifar10", "imagenet32", "imagenet64"))
    assert got == TABLE2[name]


def test_glow_paper_hyperparameters():
    card = load_card("glow")
    assert card.hparams_for("cifar10") == dict(depth=32, levels=3, hidden_channels=512)
    assert card.hparams_for("imagenet32") == dict(depth=48, levels=3, hidden_channels=512)
    assert card.hparams_for("imagenet64") == dict(depth=48, levels=4, hidden_channels=512)


@pytest.mark.parametrize("name", flowbench.list_models())
def test_laptop_cards_build_on_the_embedded_data(name):
    card = load_card(name)
    model = flowbench.build_model(name, (3, 32, 32), **card.hparams_for("embedded"))
    assert 1e5 < model.num_parameters() < 2e7


def test_unknown_model_card(tmp_path, monkeypatch):
    with pytest.raises(FlowbenchError, match="did you mean 'glow'"):
        load_card("glo")


def test_malformed_card_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWBENCH_MODELS_DIR", str(tmp_path))
    (tmp_path / "glow.yaml").write_text("name: glow\npaper: x\ndatasets:\n  cifar10: {hparams: {}, paper_bdp: 3}\n")
    with pytest.raises(FlowbenchError, match=r"glow.yaml:4: datasets.cifar10.paper_bdp: unknown key"):
        load_card("glow")


MIXERS = ("woodbury", "me_woodbury", "butterfly", "convexp", "finc")


@pytest.mark.parametrize("name", [m for m in MIXERS if m in flowbench.list_models()])
def test_a_mixers_card_says_what_its_own_paper_reports_on_each_paper_data_set(name):
    card = load_card(name)
    for dataset in ("cifar10", "imagenet32", "imagenet64"):
        published = card.published(dataset)
        assert published is not None, (name, dataset)
        assert published.bpd is not None or published.source.startswith(("not reported", "not read")), (name, dataset)
    assert card.inverse is not None


def test_a_null_published_figure_must_say_whether_the_paper_has_one():
    from flowbench.cards import Published

    assert Published(bpd=3.47, source="Lu & Huang 2020, Table 1").bpd == 3.47
    assert Published(bpd=None, source="not reported (no ImageNet run)").bpd is None
    with pytest.raises(ValueError, match="not reported"):
        Published(bpd=None, source="Table 1")
