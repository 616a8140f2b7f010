"""SA_DNN-style architectures (sensitivity_lib.sa_dnn), Setup-0 outliers (.outliers)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from sensitivity_lib import zoo
from sensitivity_lib.data import ImageSet
from sensitivity_lib.influence.outliers import shift_image, synthetic_outliers
from sensitivity_lib.influence.sa_dnn import (
    recalibrate_bn,
    sa_densenet121,
    sa_resnet50,
    trainable_modules,
)


def count(net):
    return sum(p.numel() for p in net.parameters())


def test_layer_counts_match_keras_trainable_layers():
    """Keras lists 107 trainable layers for the authors' ResNet50 and 242 for DenseNet121."""
    r = list(trainable_modules(sa_resnet50(1, 10, width=4)))
    d = list(trainable_modules(sa_densenet121(1, 10, growth=4)))
    assert len(r) == 107 and len(d) == 242
    kinds = [type(m).__name__ for _, m in r]
    assert kinds.count("Conv2d") == 53 and kinds.count("BatchNorm2d") == 53
    assert kinds[-1] == "Linear" and type(d[-1][1]).__name__ == "Linear"


def test_full_width_parameter_count_matches_the_keras_model():
    """ResNet-50 on CIFAR: the digest counts ~23.6 M parameters for the Keras model; a hand count
    of the dense layer (2x2x2048 features -> 10) and the stem pins the exact value down."""
    net = sa_resnet50(3, 10)
    assert net.fc.in_features == 2 * 2 * 2048
    assert abs(count(net) - 23.6e6) < 0.05e6
    mnist = sa_resnet50(1, 10)
    assert count(net) - count(mnist) == 64 * 2 * 3 * 3  # only the stem sees the extra channels
    dn = sa_densenet121(3, 10)
    assert dn.block_index.count(-1) == 3 and [dn.block_index.count(b) for b in range(4)] == [6, 12, 24, 16]
    assert dn.fc.in_features == 1024  # 64 + 32 * (6, 12, 24, 16) with compression 0.5


@pytest.mark.parametrize("builder, shape", [(sa_resnet50, (1, 28, 28)), (sa_densenet121, (3, 32, 32))])
def test_shapes_dropout_and_eval(builder, shape):
    torch.manual_seed(0)
    kw = {"width": 2} if builder is sa_resnet50 else {"growth": 2}
    net = builder(shape[0], 7, **kw)
    x = torch.randn(2, *shape)
    net.train()
    a, b = net(x), net(x)
    assert a.shape == (2, 7) and not torch.equal(a, b)  # dropout is active in training
    net.eval()
    assert torch.equal(net(x), net(x))
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and set(drops) == {0.2}
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    stem = net.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        sa_resnet50(0, 10)
    with pytest.raises(ValueError, match="num_classes"):
        sa_densenet121(1, 1)
    with pytest.raises(ValueError, match="too small"):
        sa_resnet50(1, 10, width=4, input_size=8)


def test_recalibrate_bn_averages_batch_statistics_with_dropout_off():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 3)
    net = torch.nn.Sequential(conv, torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    net.train()
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        net(x * 5 + 3)  # running statistics of other data
        h = conv(x)
    recalibrate_bn(net, x, batch_size=4)
    bn = net[2]
    assert not net.training and not bn.training and bn.momentum == 0.1
    # cumulative average of the two batches' means and unbiased variances, dropout off
    means = torch.stack([h[:4].mean((0, 2, 3)), h[4:].mean((0, 2, 3))])
    vars_ = torch.stack([h[:4].var((0, 2, 3)), h[4:].var((0, 2, 3))])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, vars_.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="no batch norm"):
        recalibrate_bn(torch.nn.Linear(2, 2), x)


def test_registered_with_the_zoo():
    for name in ("sa_resnet50", "sa_densenet121", "sa_resnet50_cifar", "sa_densenet121_cifar"):
        assert name in zoo.ARCHITECTURES
    recipe = zoo.Recipe("sa_resnet50", arch_kwargs=(("width", 2),))
    m = zoo.build(recipe, [str(i) for i in range(10)], 1)
    assert m.input_shape == (1, 28, 28)
    assert m.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    rc = zoo.build(zoo.Recipe("sa_densenet121_cifar", arch_kwargs=(("growth", 2),)), list("abc"), 3)
    assert rc.input_shape == (3, 32, 32) and rc.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)


# ------------------------------------------------------------------------------------------
# outliers


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(60, 1, 12, 12, generator=g) > 0.7).float()
    return ImageSet(imgs, torch.arange(60) % 3, ["a", "b", "c"], "toy")


@pytest.mark.parametrize("dy, dx", [(0, 0), (2, -3), (-4, 4), (1, 0)])
def test_shift_matches_scipy_for_integer_offsets(dy, dx):
    img = torch.rand(12, 12, generator=torch.Generator().manual_seed(1))
    ref = ndimage.shift(img.numpy(), (dy, dx), order=0, mode="constant", cval=0.0)
    assert np.array_equal(shift_image(img, dy, dx).numpy(), ref)


def test_outliers_follow_setup_0(toy):
    out = synthetic_outliers(toy, 5, max_shift=2, generator=torch.Generator().manual_seed(3))
    b, o, sh = out.meta["base_index"], out.meta["overlay_index"], out.meta["shifts"]
    assert len(out) == 15 and out.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.equal(out.labels, toy.labels[b])
    assert (toy.labels[o] != toy.labels[b]).all()  # overlay from a different class
    assert not set(b.tolist()) & set(o.tolist())  # overlays are never base images
    assert sh.abs().max() <= 2 and sh.abs().max() > 0
    for i in range(len(out)):
        (by, bx), (oy, ox) = sh[i].tolist()
        base, over = shift_image(toy.images[b[i]], by, bx), shift_image(toy.images[o[i]], oy, ox)
        want = torch.maximum(base, over)
        assert torch.equal(out.images[i], want)
    for k in range(3):  # no repeats within a class
        assert len(set(o[out.labels == k].tolist())) == 5
    again = synthetic_outliers(toy, 5, max_shift=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.images, out.images)


def test_eligible_mask_and_errors(toy):
    mask = torch.zeros(60, dtype=torch.bool)
    mask[:30] = True
    out = synthetic_outliers(toy, 4, eligible=mask)
    assert (out.meta["base_index"] < 30).all()
    with pytest.raises(ValueError, match="fewer than n_per_class"):
        synthetic_outliers(toy, 11, eligible=mask)
    with pytest.raises(ValueError, match="grey images"):
        rgb = ImageSet(torch.rand(6, 3, 4, 4), torch.arange(6) % 2, ["a", "b"], "c")
        synthetic_outliers(rgb, 1)
    with pytest.raises(ValueError, match="max_shift"):
        synthetic_outliers(toy, 1, max_shift=-1)
    with pytest.raises(ValueError, match="mask of shape"):
        synthetic_outliers(toy, 1, eligible=torch.ones(5, dtype=torch.bool))
