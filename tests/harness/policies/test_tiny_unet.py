"""The tiny U-Net backbone: shapes, the x-prediction identity, validation, save/load through the tiny-DiT loader."""

import pytest
import torch

from harness.policies.tiny_dit import TinyDiTPolicy, load_tiny_dit, save_tiny_dit
from harness.policies.tiny_unet import TinyUNet, TinyUNetConfig
from harness.shapes_world.world import VOCABULARY

SMALL = TinyUNetConfig(vocabulary=VOCABULARY, widths=(8, 16, 16), hidden=16, heads=2, text_layers=1, attention_blocks=1)


def make_policy(seed: int = 0) -> TinyDiTPolicy:
    torch.manual_seed(seed)
    return TinyDiTPolicy(TinyUNet(SMALL))


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, generator=g) * 0.9 + 0.1


def test_untrained_network_predicts_a_black_image():
    # The output conv starts at zero, so x̂0 = 0 and v = x_t / t: the straight path to the zero image.
    policy = make_policy()
    x, t = inputs()
    with torch.no_grad():
        v = policy.velocity(x, t, policy.encode(["a photo of a red circle"] * 3))
    torch.testing.assert_close(v, x / t[:, None, None, None])


def test_prompt_and_time_steer_the_output_after_a_step():
    policy = make_policy()
    x, t = inputs()
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    policy.velocity(x, t, policy.encode(["a photo of a red circle"] * 3)).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        red = policy.velocity(x, t, policy.encode(["a photo of a red circle"] * 3))
        blue = policy.velocity(x, t, policy.encode(["a photo of a blue square"] * 3))
    assert red.shape == x.shape and not torch.allclose(red, blue)


def test_save_and_load_round_trip_through_the_tiny_dit_loader(tmp_path):
    policy = make_policy()
    with torch.no_grad():
        policy.model.out.weight.normal_(std=0.05)  # a non-trivial output, so that equality means something
    save_tiny_dit(policy.model, tmp_path / "ckpt")
    network = load_tiny_dit(tmp_path / "ckpt")
    assert isinstance(network, TinyUNet) and network.cfg == SMALL
    loaded = TinyDiTPolicy(network)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(
            policy.velocity(x, t, policy.encode(["a photo of a circle"] * 3)),
            loaded.velocity(x, t, loaded.encode(["a photo of a circle"] * 3)),
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("widths", (8, 12, 16), "multiples of 8"),
        ("prediction", "eps", "prediction"),
        ("image_size", 30, "multiple of 4"),
    ],
)
def test_bad_architecture_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TinyUNetConfig(vocabulary=VOCABULARY, **{field: value})
