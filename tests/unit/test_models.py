"""Models: output shapes, published parameter counts, flat block structure, name errors."""

from __future__ import annotations

import pytest
import torch

from dpsgs.job.models import MODEL_NAMES, build_model, check_model_name


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published", [
    ("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6),  # He et al. 2016, Table 6
    ("resnet18", 11.17e6), ("wrn-16-4", 2.7e6), ("wrn-28-10", 36.5e6),  # Zagoruyko 2016
])
def test_param_counts_match_published(name: str, published: float) -> None:
    count = n_params(build_model(name, (3, 32, 32), 10))
    assert abs(count - published) / published < 0.02, (name, count)


def test_exact_counts_of_small_models() -> None:
    assert n_params(build_model("resnet20", (3, 32, 32), 10)) == 269_722
    # digits mlp: 64 -> 128 -> 128 -> 64 -> 10
    assert n_params(build_model("mlp", (1, 8, 8), 10)) == \
        64 * 128 + 128 + 128 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize("name", ["mlp", "mlp-wide", "resnet20", "wrn-10-1"])
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (3, 16, 16), 7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_resnet_on_digit_images_and_mlp_on_features() -> None:
    assert build_model("resnet20", (1, 8, 8), 10)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert build_model("mlp", (64,), 10)(torch.randn(3, 64)).shape == (3, 10)


def test_flat_block_structure() -> None:
    # stem + 3n residual blocks + head: a partition at child boundaries never cuts a skip.
    assert len(build_model("resnet20", (3, 32, 32), 10)) == 1 + 9 + 1
    assert len(build_model("resnet56", (3, 32, 32), 10)) == 1 + 27 + 1
    assert len(build_model("wrn-16-4", (3, 32, 32), 10)) == 1 + 6 + 1
    assert len(build_model("mlp", (1, 8, 8), 10)) == 4
    # the children compose to the whole model
    model = build_model("resnet20", (3, 8, 8), 10).eval()
    x = torch.randn(2, 3, 8, 8)
    h = x
    for block in model:
        h = block(h)
    assert torch.equal(h, model(x))


def test_same_seed_same_model() -> None:
    torch.manual_seed(3)
    a = build_model("resnet20", (3, 32, 32), 10)
    torch.manual_seed(3)
    b = build_model("resnet20", (3, 32, 32), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_every_listed_name_builds() -> None:
    for name in MODEL_NAMES:
        check_model_name(name)


def test_bad_names_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20.*wrn-16-4"):
        build_model("resnet21", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"wrn-15-2.*6n\+4"):
        build_model("wrn-15-2", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"'resnet20' takes images C x H x W.*\(64,\)"):
        build_model("resnet20", (64,), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("mlp", (64,), 1)
