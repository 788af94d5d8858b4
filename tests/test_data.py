"""Data: embedded CIFAR-10 split and preprocessing, torchvision CIFAR10, ImageNet class folders."""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import pil_loader as datasets_pil_loader
import torchvision.datasets.cifar
from hydra.utils import get_method
from omegaconf import OmegaConf

from qaf.config import ConfigError
from qaf.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, eval_indices, worker_count
from qaf.data import cifar10, imagenet

SHARED = Path(os.environ.get("QAF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IMAGENET_SUBSET = SHARED / "imagenet_val_1300"
needs_imagenet_subset = pytest.mark.skipif(
    not (IMAGENET_SUBSET / "val").is_dir(),
    reason=f"shared ImageNet subset not found at {IMAGENET_SUBSET} (set QAF_SHARED_DATA)",
)


CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", ["cifar10_embedded", "cifar10", "imagenet"])
def test_data_config_keys_are_builder_arguments(name: str) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"), resolve=False)
    builder = get_method(cfg.pop("_target_"))
    params = inspect.signature(builder).parameters
    assert set(cfg) <= set(params)
    assert {"calib_samples", "eval_samples", "batch_size", "num_workers", "seed", "bn_transform",
            "calib_transform"} <= set(cfg)
    assert cfg["seed"] == "${seed}" and cfg["calib_samples"] == 2048 and cfg["eval_samples"] is None
    assert (cfg["bn_transform"], cfg["calib_transform"]) == ("train", "eval")


# --- embedded CIFAR-10 ---------------------------------------------------------------------------

def test_embedded_is_the_full_test_set_and_a_training_pool() -> None:
    bundle = cifar10.embedded(seed=0)
    assert isinstance(bundle, DataBundle)
    assert (bundle.name, bundle.num_classes, bundle.input_size) == ("cifar10_embedded", 10, (3, 32, 32))
    assert len(bundle.eval) == 10_000 and len(bundle.pool) == 10_000 and len(bundle.calib()) == 2048
    assert bundle.eval.test_index.tolist() == list(range(10_000))  # official order
    x, y = bundle.eval[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    with np.load(cifar10.TRAIN_FILE) as train:
        assert np.bincount(train["labels"]).tolist() == [1000] * 10


def test_calibration_never_touches_test_images() -> None:
    with np.load(cifar10.TEST_FILE) as test, np.load(cifar10.TRAIN_FILE) as train:
        test_images = {bytes(img) for img in test["images"]}
        assert not any(bytes(img) in test_images for img in train["images"])


def test_calibration_pick_follows_seed_and_extends() -> None:
    a = cifar10.embedded(calib_samples=256, seed=1).order[:256]
    b = cifar10.embedded(calib_samples=256, seed=1).order[:256]
    c = cifar10.embedded(calib_samples=256, seed=2).order[:256]
    larger = cifar10.embedded(calib_samples=512, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(larger.order[:256], a)  # more samples extend, not reshuffle, the pick
    assert len(larger.calib(samples=300)) == 300


def test_eval_transform_matches_totensor_normalize() -> None:
    bundle = cifar10.embedded(calib_samples=8, eval_samples=8, seed=0)
    with np.load(cifar10.TEST_FILE) as raw, np.load(cifar10.TRAIN_FILE) as train:
        pil = Image.fromarray(raw["images"][0])
        label = int(raw["labels"][0])
        first = int(bundle.order[0])
        train_pil, train_label = Image.fromarray(train["images"][first]), int(train["labels"][first])
    expected = cifar10.cifar_transforms(tensor_input=False)["eval"](pil)
    x, y = bundle.eval[0]
    assert y == label
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    calib_x, calib_y = bundle.calib("eval")[0]
    assert calib_y == train_label
    torch.testing.assert_close(calib_x, cifar10.cifar_transforms(tensor_input=False)["eval"](train_pil),
                               rtol=0, atol=1e-6)


def test_training_transform_is_padded_crop_and_flip_seeded_per_image() -> None:
    bundle = cifar10.embedded(calib_samples=64, seed=0)
    eval_view, train_view = bundle.calib("eval"), bundle.calib("train")
    again = cifar10.embedded(calib_samples=64, seed=0).calib("train")
    shifted = 0
    for i in range(64):
        x, _ = train_view[i]
        torch.testing.assert_close(x, again[i][0], rtol=0, atol=0)  # reproducible
        plain = eval_view[i][0]
        # every training view is a 32x32 window of the zero-padded (pixel 0 = black) image, maybe flipped
        black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
        padded = black.expand(3, 40, 40).clone()
        padded[:, 4:36, 4:36] = plain
        windows = [padded[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.allclose(x, w, atol=1e-6) or torch.allclose(x, w.flip(-1), atol=1e-6) for w in windows)
        shifted += not torch.allclose(x, plain)
    assert shifted > 48
    # the same image gets the same augmentation in any subset, a different one under another seed
    torch.testing.assert_close(bundle.calib("train", samples=8)[3][0], train_view[3][0], rtol=0, atol=0)
    assert not all(torch.equal(train_view[i][0], cifar10.embedded(calib_samples=64, seed=0).calib(
        "train", epoch=1)[i][0]) for i in range(8))  # fresh augmentations in the next epoch


def test_loaders_are_deterministic_unshuffled_and_indexed() -> None:
    bundle = cifar10.embedded(calib_samples=300, eval_samples=100, batch_size=64, seed=0)
    first = list(bundle.eval_loader())
    second = list(bundle.eval_loader())
    assert [len(y) for _, y, _ in first] == [64, 36]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert torch.cat([i for _, _, i in first]).tolist() == list(range(100))
    assert sum(len(y) for _, y in bundle.calib_loader()) == 300
    assert sum(len(y) for _, y in bundle.bn_loader()) == 300


def test_packaged_arrays_are_read_once_read_only_and_again_when_their_file_changes(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    test, _ = cifar10.packaged_arrays()
    assert cifar10.packaged_arrays()[0]["images"] is test["images"]  # decompressed once per process
    assert not test["images"].flags.writeable  # shared by every bundle: nobody may change it
    copy = tmp_path / "test.npz"
    monkeypatch.setattr(cifar10, "TEST_FILE", copy)
    for n in (3, 5):  # a file rewritten in place is read again
        np.savez(copy, images=test["images"][:n], labels=test["labels"][:n], test_index=test["test_index"][:n])
        assert len(cifar10.packaged_arrays()[0]["labels"]) == n
        assert len(cifar10.embedded(eval_samples=None).eval) == n


def test_eval_subset_spans_the_set() -> None:
    picked = eval_indices(10_000, 100)
    assert len(set(picked.tolist())) == 100 and picked[0] == 0 and picked[-1] > 9800
    assert np.array_equal(eval_indices(5, None), np.arange(5))


@pytest.mark.parametrize("kwargs, key", [
    ({"calib_samples": 10_001}, "data.calib_samples"),
    ({"calib_samples": 0}, "data.calib_samples"),
    ({"eval_samples": 10_001}, "data.eval_samples"),
    ({"eval_samples": 0}, "data.eval_samples"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"num_workers": -1}, "data.num_workers"),
    ({"num_workers": "many"}, "data.num_workers"),
    ({"bn_transform": "augmented"}, "data.bn_transform"),
    ({"calib_transform": "test"}, "data.calib_transform"),
])
def test_embedded_bad_values_are_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        cifar10.embedded(**{"seed": 0, **kwargs})


def test_num_workers_auto_leaves_the_main_process_a_core(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert worker_count("auto") == 3 and worker_count(0) == 0 and worker_count(5) == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert worker_count("auto") == 1
    assert cifar10.embedded(num_workers="auto", calib_samples=8, seed=0).num_workers == 1
    with pytest.raises(ConfigError, match=r"data.num_workers=True .*integer >= 0 or auto"):
        worker_count(True)


def test_embedded_too_many_calibration_samples_names_the_maximum() -> None:
    with pytest.raises(ConfigError, match=r"data.calib_samples=10001 .*1\.\.10000"):
        cifar10.embedded(calib_samples=10_001, seed=0)


# --- torchvision CIFAR10 on disk -----------------------------------------------------------------

def write_official_layout(root: Path) -> None:
    """The shipped arrays as the official python archive lays them out: pickled dicts with
    'batch_label', 'labels', 'data' (N x 3072 uint8: the R, G and B planes of each 32x32 image,
    rows in order) and 'filenames'; five training batches, the test batch in official order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with np.load(cifar10.TEST_FILE) as test, np.load(cifar10.TRAIN_FILE) as train:
        splits = [(f"data_batch_{i + 1}", train, slice(2000 * i, 2000 * (i + 1))) for i in range(5)]
        for name, arrays, part in splits + [("test_batch", test, slice(None))]:
            images = arrays["images"][part]
            batch = {"batch_label": f"{name} written by qaf's tests", "labels": arrays["labels"][part].tolist(),
                     "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
                     "filenames": arrays["names"][part].tolist()}
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar10.CLASSES), "num_cases_per_batch": 10000, "num_vis": 3072}, f)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_official_layout(root)
    return root


def test_torchvision_cifar10_reads_the_official_layout(cifar_root: Path, monkeypatch) -> None:
    # torchvision checks the md5 sums of the official archive's files; re-pickled files cannot match
    # them byte for byte, so only that check is bypassed: the images and the layout are the real ones.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    bundle = cifar10.torchvision_cifar10(root=str(cifar_root), calib_samples=30, batch_size=500, num_workers=0,
                                         seed=0)
    embedded = cifar10.embedded(eval_samples=20, seed=0)
    assert (bundle.name, len(bundle.pool), len(bundle.eval)) == ("cifar10", 10_000, 10_000)
    for i in (0, 1, 9999):
        torch.testing.assert_close(bundle.eval[i][0], cifar10.embedded(seed=0).eval[i][0], rtol=0, atol=1e-6)
    assert bundle.calib("eval")[0][1] == bundle.pool[int(bundle.order[0])][1]
    assert len(embedded.eval) == 20
    # Every test image and label, in the official order, as the embedded set (whose 91.73 % top-1
    # tests/test_models.py checks): the batch files were read right.
    test = bundle.eval.dataset
    with np.load(cifar10.TEST_FILE) as arrays:
        assert np.array_equal(test.data, arrays["images"]) and test.targets == arrays["labels"].tolist()
    x, y, index = next(iter(bundle.eval_loader()))  # and they are normalized as the embedded ones
    ex, ey, _ = next(iter(cifar10.embedded(seed=0, batch_size=len(x)).eval_loader()))
    torch.testing.assert_close(x, ex, rtol=0, atol=1e-6)
    assert torch.equal(y, ey) and index.tolist() == list(range(len(x)))


def test_torchvision_cifar10_root_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root is not set"):
        cifar10.torchvision_cifar10(root=None)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere.*cifar-10-batches-py"):
        cifar10.torchvision_cifar10(root=str(missing))
    with pytest.raises(ConfigError, match=r"data.root=.*cifar-10-batches-py"):
        cifar10.torchvision_cifar10(root=str(tmp_path))  # exists, but holds no data set


# --- ImageNet class folders ----------------------------------------------------------------------

def test_wnid_list_is_canonical() -> None:
    names = imagenet.class_names()
    assert len(names) == 1000 and len({w for w, _ in names}) == 1000
    assert names[0] == ("n01440764", "tench, Tinca tinca")
    assert [w for w, _ in names] == sorted(w for w, _ in names)  # torchvision order = sorted WNIDs
    assert imagenet.wnid_to_index()["n15075141"] == 999


@needs_imagenet_subset
def test_imagenet_subset_labels_match_ground_truth() -> None:
    bundle = imagenet.folders(root=str(IMAGENET_SUBSET), calib_split="val", calib_samples=8,
                              num_workers=0, seed=0)
    folder = bundle.eval.dataset
    assert (bundle.num_classes, bundle.input_size, len(bundle.eval)) == (1000, (3, 224, 224), 1300)
    assert len(folder.classes) == 725  # a subset: numbering the folders present would be wrong
    # Ground truth of all 50,000 val images, "ILSVRC2012_val_XXXXXXXX.JPEG <class index>".
    truth_file = IMAGENET_SUBSET / "val_full50k_caffe_labels.txt"
    truth = dict(line.split() for line in truth_file.read_text().splitlines())
    labels = [(Path(p).name, y) for p, y in folder.samples]
    assert all(int(truth[name]) == y for name, y in labels)
    positional = {c: i for i, c in enumerate(folder.classes)}
    assert sum(positional[Path(p).parent.name] != y for p, y in folder.samples) > 1000
    x, y = bundle.eval[0]
    assert x.shape == (3, 224, 224) and y == int(truth[labels[0][0]])
    train_x, _ = bundle.calib("train")[0]
    again, _ = bundle.calib("train")[0]
    assert train_x.shape == (3, 224, 224) and torch.equal(train_x, again)  # RandomResizedCrop, seeded
    assert not torch.equal(train_x, bundle.calib("eval")[0][0])


@pytest.fixture
def imagenet_pool(tmp_path: Path) -> Path:
    """The shipped val/ images as both splits: the calibration pool needs train/."""
    for split in ("train", "val"):
        (tmp_path / split).symlink_to(IMAGENET_SUBSET / "val")
    return tmp_path


@needs_imagenet_subset
def test_imagenet_calibrates_on_train_split(imagenet_pool: Path) -> None:
    bundle = imagenet.folders(root=str(imagenet_pool), calib_samples=32, eval_samples=50,
                              batch_size=16, num_workers=0, seed=0)
    assert len(bundle.calib()) == 32 and len(bundle.eval) == 50
    assert Path(bundle.pool.root).name == "train"
    # Evenly spread eval subset reaches the last classes, not only the first folders.
    assert bundle.eval.dataset.targets[bundle.eval.indices[-1]] > 900
    x, y = next(iter(bundle.bn_loader()))
    assert x.shape == (16, 3, 224, 224) and y.dtype == torch.int64


@needs_imagenet_subset
def test_imagenet_decoders_give_the_same_tensors(imagenet_pool: Path) -> None:
    # torchvision.io + uint8 tensor kernels against PIL decoding and PIL's kernels (the classic
    # pipeline): evaluation tensors bit-identical; the training crops are the same crops (same
    # random draws), resampled within one pixel step (1/255) of PIL.
    bundles = {d: imagenet.folders(root=str(imagenet_pool), calib_samples=40, eval_samples=40, num_workers=0,
                                   seed=0, decoder=d) for d in imagenet.DECODERS}
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    steps = []
    for i in range(40):
        (x, y), (x_pil, y_pil) = bundles["torchvision"].eval[i], bundles["pil"].eval[i]
        assert y == y_pil and torch.equal(x, x_pil)
        crop, crop_pil = bundles["torchvision"].calib("train")[i][0], bundles["pil"].calib("train")[i][0]
        steps.append(((crop - crop_pil).abs() * std * 255).round())
    steps = torch.stack(steps)
    assert steps.max() <= 1 and steps.gt(0).float().mean() < 0.02


def test_decode_file_reads_grey_cmyk_and_png_named_jpeg(tmp_path: Path) -> None:
    # ImageNet holds a few greyscale and CMYK JPEGs and a PNG named .JPEG: every one decodes to RGB
    # exactly as PIL's RGB conversion (the classic loader) has it.
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8))
    folder = tmp_path / "val" / "n01440764"
    folder.mkdir(parents=True)
    for name, image, kind in (("grey", rgb.convert("L"), "JPEG"), ("cmyk", rgb.convert("CMYK"), "JPEG"),
                              ("png", rgb, "PNG")):
        image.save(folder / f"{name}.JPEG", format=kind)
        decoded = imagenet.decode_file(str(folder / f"{name}.JPEG"))
        assert decoded.shape == (3, 40, 50) and decoded.dtype == torch.uint8
        expected = torch.from_numpy(np.asarray(datasets_pil_loader(folder / f"{name}.JPEG"))).permute(2, 0, 1)
        assert torch.equal(decoded, expected), name
    bundle = imagenet.folders(root=str(tmp_path), calib_split="val", calib_samples=3, num_workers=0, seed=0)
    assert [tuple(bundle.eval[i][0].shape) for i in range(3)] == [(3, 224, 224)] * 3


@needs_imagenet_subset
def test_imagenet_batches_do_not_depend_on_the_worker_count(imagenet_pool: Path) -> None:
    def batches(workers: int) -> list[list[torch.Tensor]]:
        bundle = imagenet.folders(root=str(imagenet_pool), calib_samples=24, eval_samples=24, batch_size=8,
                                  num_workers=workers, seed=3)
        return [batch for loader in (bundle.eval_loader(), bundle.bn_loader(), bundle.calib_loader())
                for batch in loader]

    single, parallel = batches(0), batches(2)
    assert len(single) == len(parallel) == 9
    for a, b in zip(single, parallel):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_imagenet_decoder_is_checked(tmp_path: Path) -> None:
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data.decoder='cv2' is invalid: accepted torchvision, pil"):
        imagenet.folders(root=str(tmp_path), calib_split="val", decoder="cv2")


@needs_imagenet_subset
def test_imagenet_missing_train_split_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data.root=.*train.*data.calib_split=val"):
        imagenet.folders(root=str(IMAGENET_SUBSET))


def test_imagenet_root_and_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root is not set"):
        imagenet.folders(root=None)
    with pytest.raises(ConfigError, match=r"data.root=.*val"):
        imagenet.folders(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="data.calib_split"):
        imagenet.folders(root=str(tmp_path), calib_split="test")
    (tmp_path / "val" / "cats").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data.root.*not ImageNet WNIDs.*cats"):
        imagenet.folders(root=str(tmp_path), calib_split="val")


def test_imagenet_empty_split_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images under"):
        imagenet.folders(root=str(tmp_path), calib_split="val")
