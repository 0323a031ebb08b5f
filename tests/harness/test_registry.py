import pytest

from benchmarks import BENCHMARKS
from harness.registry import Registry
from methods import METHODS
from rewards import REWARDS


def test_lazy_get_and_listing():
    registry: Registry = Registry("thing")
    registry.add("json_dumps", "json:dumps", "serialise")
    assert registry.keys() == ["json_dumps"]
    import json

    assert registry.get("json_dumps") is json.dumps
    assert registry.entries()[0].description == "serialise"


def test_errors_name_the_key_and_suggest():
    registry: Registry = Registry("thing")
    registry.add("diffusion_nft", "json:dumps", "x")
    with pytest.raises(KeyError, match="Did you mean 'diffusion_nft'"):
        registry.get("diffusion_nf")
    with pytest.raises(KeyError, match="already registered"):
        registry.add("diffusion_nft", "json:loads", "y")
    with pytest.raises(ValueError, match="lower_snake_case"):
        registry.add("DiffusionNFT", "json:loads", "y")
    with pytest.raises(ValueError, match="module:attribute"):
        registry.add("nft", "json.loads", "y")


@pytest.mark.parametrize("registry", [METHODS, REWARDS, BENCHMARKS], ids=lambda r: r.kind)
def test_every_registered_target_imports(registry):
    for entry in registry.entries():
        assert registry.get(entry.key) is not None
