import pytest
import torch

torch.set_num_threads(1)

AREAS = ("models", "service", "training", "deploy", "bench")  # folders and markers: -m "not deploy"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.parent.name in AREAS:
            item.add_marker(item.path.parent.name)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm trained-looking statistics and affine parameters (freshly
    initialized ones are identities, which would hide errors in BN folding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
