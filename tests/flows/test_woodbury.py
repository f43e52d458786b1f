import pytest
import torch

import flowbench
from flowbench.cards import load_card
from flowbench.flows.base import effective_parameter_count
from flowbench.flows.woodbury import ChannelWoodbury, MEWoodbury, SpatialWoodbury, Woodbury
from tests.flows.harness import check_flow, randomize_parameters
from tests.flows.test_param_counts import glow_family


@pytest.mark.parametrize(("channels", "rank"), [(3, 2), (4, 4), (2, 5)])
def test_channel_woodbury_passes_harness(channels, rank):
    check_flow(lambda: ChannelWoodbury(channels, rank), shape=(channels, 3, 4), scale=0.3)


SPATIAL_CASES = [
    ("hw", (2, 3, 4), 3),
    ("hw", (3, 2, 2), 6),
    ("w", (2, 3, 5), 2),
    ("h", (2, 3, 5), 2),
    ("h", (1, 4, 2), 5),
]


@pytest.mark.parametrize(("along", "shape", "rank"), SPATIAL_CASES)
def test_spatial_woodbury_passes_harness(along, shape, rank):
    _, height, width = shape
    size = {"hw": height * width, "w": width, "h": height}[along]
    check_flow(lambda: SpatialWoodbury(size, rank, along), shape=shape, scale=0.3)


def test_woodbury_and_me_woodbury_pass_harness():
    check_flow(lambda: Woodbury(3, (3, 4), channel_rank=2, spatial_rank=5), shape=(3, 3, 4), scale=0.3)
    check_flow(lambda: Woodbury(2, (1, 1), channel_rank=4, spatial_rank=3), shape=(2, 1, 1), scale=0.3)
    check_flow(lambda: MEWoodbury(2, (3, 5), channel_rank=2, height_rank=2, width_rank=3), shape=(2, 3, 5), scale=0.3)


def dense_matrix(layer, shape):
    """d layer(x) / dx as [C·H·W out, C·H·W in]; the layers are linear, so any x will do."""
    x = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x, vectorize=True)
    return jac.reshape(x.numel(), x.numel())


def random_layer(make, seed=0, scale=0.4):
    torch.manual_seed(seed)
    layer = make().double()
    randomize_parameters(layer, scale, seed)
    return layer


@pytest.mark.parametrize(
    "make",
    [lambda: Woodbury(3, (4, 5), 2, 4), lambda: MEWoodbury(3, (4, 5), 2, 3, 2)],
    ids=["woodbury", "me_woodbury"],
)
def test_inverse_and_logdet_equal_a_dense_solve(make):
    layer = random_layer(make)
    matrix = dense_matrix(layer, (3, 4, 5))
    y = torch.randn(4, 3, 4, 5, dtype=torch.float64)
    dense = torch.linalg.solve(matrix, y.flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(y)[1], torch.linalg.slogdet(matrix)[1].expand(4), atol=1e-10, rtol=0)


def test_each_map_is_the_authors_matrix_product():
    """The orientation of WoodburyTrans.py: channels z = x + U(Vx), pixels z = x + (xU)V, the ME
    width map on rows [B, C·H, W] and the height map on [B, C·W, H] after swapping H and W."""
    b, c, h, w = 2, 3, 4, 5
    x = torch.randn(b, c, h, w, dtype=torch.float64)

    channel = random_layer(lambda: ChannelWoodbury(c, 2))
    want = x.view(b, c, h * w) + channel.U @ (channel.V @ x.view(b, c, h * w))
    torch.testing.assert_close(channel(x)[0], want.view(b, c, h, w))

    pixels = random_layer(lambda: SpatialWoodbury(h * w, 3, "hw"))
    want = x.view(b, c, h * w) + x.view(b, c, h * w) @ pixels.U @ pixels.V
    torch.testing.assert_close(pixels(x)[0], want.view(b, c, h, w))

    rows = random_layer(lambda: SpatialWoodbury(w, 2, "w"))
    want = x.view(b, c * h, w) + x.view(b, c * h, w) @ rows.U @ rows.V
    torch.testing.assert_close(rows(x)[0], want.view(b, c, h, w))

    columns = random_layer(lambda: SpatialWoodbury(h, 2, "h"))
    swapped = x.permute(0, 1, 3, 2).reshape(b, c * w, h)
    want = (swapped + swapped @ columns.U @ columns.V).view(b, c, w, h).permute(0, 1, 3, 2)
    torch.testing.assert_close(columns(x)[0], want)


def test_me_woodbury_runs_channel_then_width_then_height():
    layer = random_layer(lambda: MEWoodbury(2, (3, 4), 2, 2, 2))
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    channel, width, height = layer.layers
    assert (width.along, height.along) == ("w", "h")
    torch.testing.assert_close(layer(x)[0], height(width(channel(x)[0])[0])[0])


def test_initialisation_is_the_authors_near_identity():
    torch.manual_seed(0)
    layer = Woodbury(48, (16, 16), channel_rank=16, spatial_rank=16)
    for param in layer.parameters():
        assert abs(param.std().item() - 0.01) < 0.001 and abs(param.mean().item()) < 0.001
    x = torch.randn(2, 48, 16, 16)
    y, logdet = layer(x)
    assert (y - x).abs().max() < 0.01 * x.abs().max()
    assert logdet.abs().max() < 1.0  # summed over 48·256 dimensions: log|det| per dimension < 1e-4


def test_the_count_is_every_entry_of_u_and_v_and_nothing_else():
    woodbury = Woodbury(12, (16, 16), channel_rank=16, spatial_rank=8)
    me = MEWoodbury(12, (16, 8), channel_rank=16, height_rank=4, width_rank=2)
    assert effective_parameter_count(woodbury) == 2 * 12 * 16 + 2 * 256 * 8
    assert effective_parameter_count(me) == 2 * 12 * 16 + 2 * 8 * 2 + 2 * 16 * 4
    assert sorted(name.rsplit(".", 1)[1] for name, _ in me.named_parameters()) == ["U", "U", "U", "V", "V", "V"]
    assert list(me.buffers()) == []


def test_every_entry_of_u_and_v_changes_the_map():
    layer = random_layer(lambda: MEWoodbury(3, (4, 5), 2, 3, 2))
    x = torch.randn(4, 3, 4, 5, dtype=torch.float64)
    y, logdet = layer(x)
    ((y * torch.randn_like(y)).sum() + logdet.sum()).backward()
    assert all(bool((p.grad != 0).all()) for p in layer.parameters())


def test_spatial_layer_refuses_another_size():
    layer = SpatialWoodbury(16, 2, "hw")
    with pytest.raises(ValueError, match="built for 16 pixels, got 12"):
        layer(torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="rank must be at least 1"):
        ChannelWoodbury(4, 0)


def test_float32_logdet_matches_float64():
    layer = random_layer(lambda: Woodbury(12, (16, 16), 16, 16), scale=0.05)
    x = torch.randn(2, 12, 16, 16, dtype=torch.float64)
    exact = layer(x)[1]
    torch.testing.assert_close(layer.float()(x.float())[1].double(), exact, rtol=1e-6, atol=0)


def woodbury_mixer(hp, me):
    """Entries of a step's U and V on C channels of a 3×32×32 image (level l: C = 12·2^l, side 16 / 2^l)."""

    def count(channels):
        side = 192 // channels
        if me:
            return 2 * channels * hp["channel_rank"] + 2 * side * (hp["width_rank"] + hp["height_rank"])
        return 2 * channels * hp["channel_rank"] + 2 * side * side * hp["spatial_rank"]

    return count


@pytest.mark.parametrize("name", ["woodbury", "me_woodbury"])
def test_count_at_the_cifar10_card_equals_the_hand_count(name):
    """Glow's hand count with each step's C×C 1×1 conv replaced by the mixer's U and V."""
    hp = load_card(name).hparams_for("cifar10")
    model = flowbench.build_model(name, (3, 32, 32), **hp)
    mixer = woodbury_mixer(hp, me=name == "me_woodbury")
    assert model.num_parameters() == glow_family(mixer, hp["depth"], hp["levels"], hp["hidden_channels"])
