"""Per-layer norm placement against SPEC.md: Mix-LN makes layers ℓ < ⌊α·L⌋ Post-LN, the rest Pre-LN."""

import pytest

from megamix.config import NormConfig
from megamix.model.placement import deepnorm_constants, layer_placements

# (alpha, layers) → number of Post-LN layers, written out from SPEC.md's statements.
EXPECTED_POST = {
    (0.0, 12): 0, (0.25, 12): 3, (0.5, 12): 6, (1.0, 12): 12,
    (0.0, 32): 0, (0.25, 32): 8, (0.5, 32): 16, (1.0, 32): 32,
    (0.25, 24): 6, (0.0625, 32): 2, (0.29, 100): 29,
}


@pytest.mark.parametrize("alpha,layers", sorted(EXPECTED_POST))
def test_mix_makes_the_first_floor_alpha_L_layers_post_ln(alpha, layers):
    n = EXPECTED_POST[(alpha, layers)]
    assert layer_placements(NormConfig(scheme="mix", alpha=alpha), layers) == ["post"] * n + ["pre"] * (layers - n)


def test_mix_alpha_zero_is_pre_and_one_is_post():
    assert layer_placements(NormConfig(scheme="mix", alpha=0.0), 12) == layer_placements(NormConfig(scheme="pre"), 12)
    assert layer_placements(NormConfig(scheme="mix", alpha=1.0), 12) == layer_placements(NormConfig(scheme="post"), 12)


@pytest.mark.parametrize("scheme", ["pre", "post", "lns", "peri", "deepnorm"])
def test_uniform_schemes_apply_to_every_layer(scheme):
    assert layer_placements(NormConfig(scheme=scheme), 12) == [scheme] * 12


def test_explicit_layers_override_the_scheme():
    layers = ["post", "pre", "lns", "peri", "deepnorm", "pre"]
    assert layer_placements(NormConfig(scheme="mix", alpha=0.5, layers=layers), 6) == layers


def test_deepnorm_constants_follow_deepnet_and_can_reproduce_the_reference():
    a, b = deepnorm_constants(NormConfig(scheme="deepnorm"), 32)
    assert a == pytest.approx(64 ** 0.25) and b == pytest.approx(256 ** -0.25)
    a, b = deepnorm_constants(NormConfig(scheme="deepnorm", deepnorm_alpha=2.8284, deepnorm_beta=256 ** 0.25), 12)
    assert (a, b) == (2.8284, pytest.approx(4.0))
