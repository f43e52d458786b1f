import math

import pandas as pd

from flowbench.results.mixers import mixer_table, published_cell


def table2_rows(*rows):
    base = {"variant": "", "dataset": "embedded", "n_seeds": 3, "num_params": 600000, "flops_per_image": 2.6e8}
    return pd.DataFrame([base | r for r in rows])


def test_the_mixer_table_puts_each_papers_own_figure_beside_ours():
    table2 = table2_rows(
        {"model": "glow", "test_bpd_mean": 3.59, "test_bpd_ci_low": 3.53, "test_bpd_ci_high": 3.65},
        {"model": "convexp", "test_bpd_mean": 3.5, "test_bpd_ci_low": math.nan, "test_bpd_ci_high": math.nan},
        {"model": "realnvp", "test_bpd_mean": 4.8, "test_bpd_ci_low": 4.6, "test_bpd_ci_high": 5.0},
    )
    latency = pd.DataFrame(
        [
            {"model": "glow", "kind": "density", "batch_size": 1, "median_ms": 10.0},
            {"model": "glow", "kind": "density", "batch_size": 1, "median_ms": 12.0},
            {"model": "glow", "kind": "density", "batch_size": 16, "median_ms": 99.0},
            {"model": "glow", "kind": "sampling", "batch_size": 1, "median_ms": 20.0},
        ]
    )
    table = mixer_table(table2, latency).set_index("mixer")
    assert list(table.index) == ["glow", "convexp"]  # RealNVP has no mixer: not a row
    assert table.loc["glow", "test bpd, embedded (ours)"] == "3.590 [3.530, 3.650]"
    assert table.loc["glow", "CIFAR-10 (published)"] == "3.35 (n×n paper's Table 2)"  # glow's card: paper_bpd only
    assert table.loc["glow", "density ms (batch 1)"] == "11.0" and table.loc["glow", "sampling ms (batch 1)"] == "20.0"
    assert table.loc["convexp", "inverse"] == "series" and table.loc["convexp", "density ms (batch 1)"] == "—"
    assert table.loc["convexp", "ImageNet 32 (published)"] == "not reported"


def test_a_published_figure_names_its_table():
    from flowbench.cards import load_card

    card = load_card("emerging")
    assert published_cell("emerging", "cifar10") == f"{card.paper_bpd('cifar10'):.2f} (n×n paper's Table 2)"
    assert published_cell("emerging", "digits") == "—"


def test_the_report_has_a_mixer_section_only_where_mixers_are_compared():
    from flowbench.results.mixers import mixer_sections

    one = table2_rows({"model": "glow", "test_bpd_mean": 3.59, "test_bpd_ci_low": 3.5, "test_bpd_ci_high": 3.7})
    two = pd.concat([one, one.assign(model="woodbury")], ignore_index=True)
    assert mixer_sections(one) == []
    (section,) = mixer_sections(two)
    assert list(section.table["mixer"]) == ["glow", "woodbury"] and "only difference" in section.paragraphs[0]
