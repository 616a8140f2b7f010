import pytest
import torch
from torch import nn

from sensitivity_lib import data, zoo


@pytest.fixture(scope="module")
def mnist20():
    return data.mnist_test20()


@pytest.mark.parametrize("variant", ["standard", "adversarial"])
def test_lenet5_pair_is_pretrained(variant, mnist20):
    m = zoo.lenet5(variant)
    assert m.pretrained and m.input_shape == (1, 28, 28)
    n_correct = int((m.predict(mnist20.images) == mnist20.labels).sum())
    assert n_correct >= 19  # both reach ~99% on MNIST


def test_lenet5_variants_differ():
    a, b = zoo.lenet5("standard"), zoo.lenet5("adversarial")
    assert not torch.equal(a.net.conv1.weight, b.net.conv1.weight)
    with pytest.raises(ValueError, match="variant"):
        zoo.lenet5("robust")


def test_efficientnet_lite0_is_pretrained():
    m = zoo.efficientnet_lite0()
    photos = data.imagenet_samples(224, extra=False)[:6]
    assert m.accuracy(photos.images, photos.labels) >= 4 / 6  # 17/20 on all twenty
    assert m.classes[243] == "bull mastiff"


def test_normalisation_is_inside_the_wrapper():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    m = zoo.Normalized(net, (0.5, 0.25, 0.0), (0.5, 0.5, 2.0), input_shape=(3, 2, 2), classes=["a", "b"],
                       name="toy", pretrained=False, weights_note="random")  # fmt: skip
    x = torch.rand(4, 3, 2, 2)
    mean = torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(m(x), net((x - mean) / std))


def test_wrapper_rejects_bad_input_and_accepts_it_under_torch_func(mnist20):
    m = zoo.lenet5()
    with pytest.raises(ValueError, match="axis H"):
        m(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="axis C"):
        m(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="pixels in"):
        m(mnist20.images[:1] * 255)
    # under vmap/jvp the (data-dependent) check is skipped, and the function is the same
    x = mnist20.images[:2]
    out = torch.func.vmap(lambda z: m(z.unsqueeze(0)).squeeze(0))(x)
    assert torch.allclose(out, m(x), atol=1e-5)


def test_torchvision_without_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as err:
        zoo.torchvision_model("alexnet")
    assert str(tmp_path) in str(err.value) and "weights=None" in str(err.value)
    with pytest.raises(ValueError, match="weights must be"):
        zoo.torchvision_model("alexnet", weights="imagenet1k")
    with pytest.raises(ValueError, match="name must be"):
        zoo.torchvision_model("lenet")


def test_torchvision_loads_a_checkpoint_from_torch_home(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = zoo.torchvision_checkpoint("alexnet")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    reference = torchvision.models.alexnet(weights=None)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    m = zoo.torchvision_model("alexnet", weights="imagenet")
    assert m.pretrained and "alexnet-owt" in m.weights_note
    for (k, v), (k2, v2) in zip(m.net.state_dict().items(), reference.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_random_init_is_explicit_seeded_and_labelled():
    a = zoo.torchvision_model("alexnet", weights=None, seed=3)
    b = zoo.torchvision_model("alexnet", weights=None, seed=3)
    assert not a.pretrained and "random" in a.weights_note
    assert torch.equal(a.net.features[0].weight, b.net.features[0].weight)
    from sensitivity_lib.plotting import title_for

    assert "RANDOM" in title_for(a, "x") and "RANDOM" not in title_for(zoo.lenet5(), "x")


def test_training_is_deterministic_cached_and_keeps_the_callers_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("SENSITIVITY_CACHE", str(tmp_path))
    def tiny(num_classes, in_channels):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))

    zoo.register_architecture("tiny", tiny, mean=(0.5,), std=(0.5,), input_shape=(1, 8, 8))
    recipe = zoo.Recipe("tiny", dataset="digits8x8", epochs=2, n_train=500, n_test=200, batch_size=50,
                        lr=1e-2)  # fmt: skip
    torch.manual_seed(123)
    m1, r1 = zoo.train(recipe, progress=False)
    after_training = torch.rand(1)
    files = list((tmp_path / "models").glob("tiny-*.pt"))
    assert len(files) == 1 and recipe.key() in files[0].name
    torch.manual_seed(123)
    m2, r2 = zoo.train(recipe, progress=False)  # from the cache
    assert torch.equal(torch.rand(1), after_training)  # same caller RNG state either way
    assert r1 == r2 and r1.test_accuracy > 0.8
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    m3, r3 = zoo.train(recipe, progress=False, cache=False)  # retrained from scratch: identical
    for p, q in zip(m1.parameters(), m3.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="unknown architecture"):
        zoo.train(zoo.Recipe("nope", dataset="digits8x8"))
