import pytest
import torch

import flowbench
from flowbench.flows import MaskedAutoregressiveConv2d
from flowbench.flows.base import effective_parameter_count
from flowbench.flows.finc import CORNERS, CInCConv2d, FInCConv2d, solve_padded_conv, top_left_wavefronts
from tests.flows.harness import check_flow
from tests.flows.test_emerging import assert_support, dense_matrix, pixel_blocks, random_layer


@pytest.mark.parametrize(
    ("channels", "kernel_size", "shape"),
    [(4, 3, (4, 5, 6)), (8, 3, (8, 3, 7)), (12, 2, (12, 4, 4)), (4, 5, (4, 4, 6)), (4, 1, (4, 3, 3))],
)
def test_finc_unit_passes_harness(channels, kernel_size, shape):
    check_flow(lambda: FInCConv2d(channels, shape[1:], kernel_size), shape=shape, scale=0.3)


def test_channels_must_split_in_four_quarters():
    with pytest.raises(ValueError, match="four quarters"):
        FInCConv2d(6, (4, 4))


def release_mask(channels, kernel_size, order):
    """``PaddedConv2d.get_mask`` of the release, step by step."""
    mask = torch.ones(channels, channels, kernel_size, kernel_size)
    for c_out in range(channels):
        mask[c_out, c_out, -1, -1] = 0.0
        mask[c_out, c_out + 1 :, -1, -1] = 0.0
    return {"TL": mask, "TR": mask.flip(3), "BL": mask.flip(2), "BR": mask.flip(2, 3)}[order]


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_masks_and_initialisation_are_the_releases(kernel_size):
    torch.manual_seed(0)
    layer = FInCConv2d(12, (8, 8), kernel_size)
    for g, (mask, weight, corner) in enumerate(zip(layer.mask.chunk(4), layer.weight.chunk(4), CORNERS, strict=True)):
        assert torch.equal(mask, release_mask(3, kernel_size, corner)), corner
        # reset_parameters: the fixed entries hold 1 on the diagonal and 0 above it, so the stored
        # weight is the kernel the map uses
        torch.testing.assert_close(weight, layer.kernel()[3 * g : 3 * (g + 1)], rtol=0, atol=0)
    free = layer.weight[layer.mask.bool()]
    assert abs(free.std().item() - 0.05) < 0.01 and abs(free.mean().item()) < 0.01


def test_each_quarter_reads_its_own_corner_and_its_own_channels():
    """TL output (i, j) reads inputs (i−a, j−b), 0 ≤ a, b < k; TR (i−a, j+b); BL (i+a, j−b); BR
    (i+a, j+b); no quarter reads another; the tap on the pixel itself is lower triangular with 1s
    on its diagonal, whatever the weights."""
    k, quarter, size = 3, 2, 5
    layer = random_layer(lambda: FInCConv2d(4 * quarter, (size, size), k), seed=3, scale=0.5)
    jac = dense_matrix(layer, (4 * quarter, size, size)).view(4 * quarter, size, size, 4 * quarter, size, size)
    signs = {"TL": (-1, -1), "TR": (-1, 1), "BL": (1, -1), "BR": (1, 1)}
    for g, corner in enumerate(CORNERS):
        rows = slice(g * quarter, (g + 1) * quarter)
        own = jac[rows, :, :, rows].permute(1, 2, 4, 5, 0, 3)  # [out i, out j, in i, in j, c_out, c_in]
        si, sj = signs[corner]
        # input p reaches output q = p − (si·a, sj·b)
        assert_support(own, [(-si * a, -sj * b) for a in range(k) for b in range(k)])
        centre = own[2, 2, 2, 2]
        torch.testing.assert_close(centre, torch.tril(centre), rtol=0, atol=0)
        torch.testing.assert_close(torch.diagonal(centre), torch.ones(quarter, dtype=torch.float64))
        others = torch.ones(4 * quarter, dtype=torch.bool)
        others[rows] = False
        assert jac[rows][:, :, :, others].abs().max() == 0, f"{corner} reads another quarter"


def test_inverse_equals_dense_solve_and_log_det_is_zero():
    shape = (8, 4, 5)
    layer = random_layer(lambda: FInCConv2d(8, shape[1:], 3), seed=4, scale=0.2)
    matrix = dense_matrix(layer, shape)
    y = torch.randn(3, *shape, dtype=torch.float64)
    dense = torch.linalg.solve(matrix, y.flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)
    assert torch.equal(layer(y)[1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.slogdet(matrix)[1], torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("kernel_size", [1, 2, 3])
def test_solve_padded_conv_inverts_a_top_left_conv(kernel_size, upper):
    torch.manual_seed(kernel_size)
    channels, p = 3, kernel_size - 1
    kernel = 0.2 * torch.randn(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    centre = kernel[:, :, p, p] + torch.eye(channels, dtype=torch.float64)
    kernel[:, :, p, p] = torch.triu(centre) if upper else torch.tril(centre)
    x = torch.randn(2, channels, 5, 4, dtype=torch.float64)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (p, 0, p, 0)), kernel)
    torch.testing.assert_close(solve_padded_conv(y, kernel, upper=upper), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("flipped", [False, True])
def test_solve_padded_conv_inverts_emergings_masked_convs(flipped):
    """The helper solves flows/emerging.py's convs too: the flipped one reads the k×k quadrant above
    and left (upper-triangular centre), the other the quadrant below and right, which flipping the
    image and the kernel turns into the first kind (lower-triangular centre)."""
    layer = random_layer(lambda: MaskedAutoregressiveConv2d(3, 5, flipped, bias=True), seed=2, scale=0.2)
    y = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    centred = y - layer.bias[:, None, None]
    if flipped:
        x = solve_padded_conv(centred, layer.kernel()[:, :, :3, :3], upper=True)
    else:
        x = solve_padded_conv(centred.flip(2, 3), layer.kernel()[:, :, 2:, 2:].flip(2, 3)).flip(2, 3)
    torch.testing.assert_close(x, layer.inverse(y), atol=1e-12, rtol=0)


def test_inverse_solves_anti_diagonals_not_pixels():
    height, width = 32, 24
    fronts = top_left_wavefronts(height, width, 3, torch.device("cpu"))
    assert len(fronts) == height + width - 1  # against H·W = 768 pixels
    solved = torch.cat([pixels for _, pixels in fronts])
    assert len(solved) == height * width and len(solved.unique()) == height * width
    assert fronts[0][1].tolist() == [2 * (width + 2) + 2]  # the top-left pixel, which depends on no other


def test_effective_parameters_are_the_free_entries():
    """Per quarter of q channels: q² per tap, less the diagonal and upper triangle of the tap on the
    pixel itself; k = 3 on 48 channels: 4 · (12² · 9 − 12 · 13 / 2) = 4,872 of 5,184 allocated."""
    layer = FInCConv2d(48, (4, 4), 3)
    assert effective_parameter_count(layer) == 4 * (12 * 12 * 9 - 12 * 13 // 2) == 4872
    assert layer.weight.numel() == 5184


def test_finc_model_steps_are_the_unit_then_a_1x1_conv():
    model = flowbench.build_model("finc", (3, 8, 8), depth=1, levels=1, hidden_channels=8)
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("FInCConv2d") == 1 and kinds.count("InvConv1x1") == 1
    assert kinds.index("ActNorm") < kinds.index("FInCConv2d") < kinds.index("InvConv1x1")


def test_cinc_layer_reads_the_k_by_k_square_above_left_with_a_free_diagonal():
    """CInC's conv: a padded k×k conv (the (2k−1)² weight of the release, of which its forward reads
    one quadrant), centre upper triangular with a free diagonal: log|det| = H·W·Σ log|w_cc|."""
    k, channels, size = 3, 3, 5
    model = flowbench.build_model("cinc", (3, 8, 8), depth=1, levels=1, hidden_channels=8, kernel_size=k)
    assert [type(m) for m in model.modules()].count(CInCConv2d) == 1
    layer = random_layer(lambda: CInCConv2d(channels, (size, size), k), seed=5)
    assert layer.kernel_size == 2 * k - 1 and layer.flipped and layer.bias is not None
    blocks = pixel_blocks(layer, channels, size, size)
    assert_support(blocks, [(a, b) for a in range(k) for b in range(k)])  # input p reaches outputs p + (a, b)
    centre = blocks[2, 2, 2, 2]
    torch.testing.assert_close(centre, torch.triu(centre), rtol=0, atol=0)
    assert (torch.diagonal(centre) != 1).all()  # the diagonal moved with the weights: free, unlike FInC's
    assert effective_parameter_count(CInCConv2d(48, (4, 4), k)) == (k * k - 1) * 48 * 48 + 48 * 49 // 2 + 48


@pytest.mark.parametrize(("size", "taps"), [((2, 2), 4), ((2, 1), 2), ((1, 1), 1), ((3, 5), 9)])
def test_taps_that_read_only_padding_are_not_counted(size, taps):
    """On an image smaller than the kernel (a 2×2 level of a small image), the far taps of a corner
    conv never reach a pixel: they cannot change the map, so they are masked out, not counted."""
    q = 3
    finc, cinc = FInCConv2d(4 * q, size, 3), CInCConv2d(q, size, 3)
    assert effective_parameter_count(finc) == 4 * (q * q * (taps - 1) + q * (q - 1) // 2)
    assert effective_parameter_count(cinc) == q * q * (taps - 1) + q * (q + 1) // 2 + q
    check_flow(lambda: FInCConv2d(4 * q, size, 3), shape=(4 * q, *size), scale=0.3)
    check_flow(lambda: CInCConv2d(q, size, 3), shape=(q, *size), scale=0.3)


def test_model_counts_are_glows_plus_the_mixers_free_entries():
    glow, finc, cinc = (
        flowbench.build_model(name, (3, 32, 32), depth=2, levels=3, hidden_channels=16).num_parameters()
        for name in ("glow", "finc", "cinc")
    )
    per_step = {c: (c * c, 4 * ((c // 4) ** 2 * 9 - (c // 4) * (c // 4 + 1) // 2) + c * c) for c in (12, 24, 48)}
    assert finc - glow == 2 * sum(f - g for g, f in per_step.values())
    cinc_mixer = {c: 8 * c * c + c * (c + 1) // 2 + c for c in (12, 24, 48)}
    assert cinc - glow == 2 * sum(cinc_mixer[c] - per_step[c][0] for c in (12, 24, 48))
