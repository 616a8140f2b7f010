import pytest
import torch
from helpers import write_fake_cifar10

from sensitivity_lib import data


@pytest.mark.parametrize(
    "loader, shape, n, first_labels",
    [
        (data.mnist_test20, (1, 28, 28), 20, [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),  # MNIST test order
        (data.cifar10_test20, (3, 32, 32), 20, [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]),  # CIFAR-10 test order
        (data.digits8x8, (1, 8, 8), 1797, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ],
)
def test_small_loaders(loader, shape, n, first_labels):
    ds = loader()
    assert ds.shape == shape and len(ds) == n
    assert ds.images.dtype == torch.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.labels[:10].tolist() == first_labels
    assert len(ds.classes) == 10


def test_digits8x8_equals_scikit_learns_loader():
    from sklearn.datasets import load_digits

    ds, ref = data.digits8x8(), load_digits()
    assert torch.equal(ds.images, torch.from_numpy(ref.images.astype("float32") / 16.0).unsqueeze(1))
    assert ds.labels.tolist() == ref.target.tolist()


def test_mnist5k_is_balanced_and_split_is_disjoint_and_stratified():
    ds = data.mnist5k()
    assert ds.images.shape == (5000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    tr, te = ds.split(4000, 1000, seed=0)
    assert torch.bincount(tr.labels).tolist() == [400] * 10
    # disjoint: no test image equals a training image
    flat_tr = {hash(t.numpy().tobytes()) for t in tr.images}
    assert not any(hash(t.numpy().tobytes()) in flat_tr for t in te.images)
    tr2, _ = ds.split(4000, 1000, seed=0)
    assert torch.equal(tr.images, tr2.images)
    with pytest.raises(ValueError, match="asked for"):
        ds.split(4000, 1001)


def test_imagenet_samples_pipeline_and_labels():
    ds = data.imagenet_samples(size=64)
    assert ds.images.shape == (27, 3, 64, 64)
    assert ds.labels[:3].tolist() == [243, 559, 438]  # from foolbox's file names
    assert ds.meta["true_label"].sum() == 20
    assert ds.classes[243] == "bull mastiff" and len(ds.classes) == 1000
    only = data.imagenet_samples(size=32, extra=False)
    assert len(only) == 20


def test_resize_center_crop_matches_the_definition():
    # a 4x8 image whose columns are numbered: resizing the short side 4 -> 4 keeps it, the centre
    # crop of width 4 keeps columns 2..5
    x = torch.arange(8.0).repeat(4, 1).view(1, 1, 4, 8) / 8
    out = data.resize_center_crop(x, size=4, resize=4)
    assert torch.allclose(out, x[..., 2:6])


def test_indexing_keeps_names():
    ds = data.mnist_test20()
    sub = ds[[3, 1]]
    assert sub.labels.tolist() == [0, 2] and sub.names == [ds.names[3], ds.names[1]]
    assert len(ds[2:5]) == 3 and len(ds[0]) == 1


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(3, 28, 28), "shape \\(N, C, H, W\\)"),
        (torch.full((1, 1, 2, 2), float("nan")), "NaN"),
        (torch.full((1, 1, 2, 2), 2.0), "pixels in \\[0, 1\\]"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "divide uint8"),
    ],
)
def test_check_images_errors(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        data.check_images(x)


def test_full_scale_loaders_never_download(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="MNIST_ROOT"):
        data.mnist()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="validation tree"):
        data.imagenet_folder(tmp_path)
    assert not any(tmp_path.iterdir()), "a loader wrote into the data root"


def test_imagenet_folder_reads_a_user_tree(tmp_path):
    from PIL import Image

    for k in range(1000):
        (tmp_path / f"n{k:08d}").mkdir()
    img = (torch.rand(40, 50, 3) * 255).byte().numpy()
    Image.fromarray(img).save(tmp_path / "n00000007" / "a.JPEG")
    ds = data.imagenet_folder(tmp_path, size=32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 7 and 0 <= x.min() and x.max() <= 1
    subset = data.take(ds, 1)
    assert subset.labels.tolist() == [7] and subset.classes[7] == data.imagenet_classes()[7]


def test_cifar10_reads_the_official_batches(tmp_path, monkeypatch):
    x, y = write_fake_cifar10(tmp_path)
    ds = data.cifar10(tmp_path)
    assert ds.images.shape == (10, 3, 32, 32) and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == y
    assert torch.equal(ds.images, torch.from_numpy(x).float() / 255)
    assert len(data.cifar10(tmp_path, train=False)) == 2
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    assert torch.equal(data.cifar10().images, ds.images)
    # the same images, labels and order as torchvision's reader (its MD5 check switched off)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR10(str(tmp_path), train=True, download=False)
    assert list(tv.targets) == y
    assert torch.equal(ds.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2).float() / 255)


def test_cifar10_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*\$CIFAR10_ROOT"):
        data.cifar10()
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3' is missing.*cifar-10-python\.tar\.gz"):
        data.cifar10(tmp_path)
    assert len(data.cifar10(tmp_path, train=False)) == 2  # the test batch is still there
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.cifar10(tmp_path, train=False)
