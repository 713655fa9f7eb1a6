"""The external components the system is built on are installed and work on this machine.

Each later part (data backends, tracking, SLURM) has its own deeper tests; these make a missing
or broken install fail loudly in one obvious place. In CI a skip here is a failure (conftest.py).
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO


def test_torch_is_the_pinned_build():
    """The versions constraints.txt pins (torch with its torchvision, so timm imports) are the ones running."""
    import re

    import timm
    import torchvision

    pins = dict(re.findall(r"^(torch|torchvision|timm)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    assert torch.__version__.split("+")[0] == pins["torch"] == "2.14.1"
    assert torchvision.__version__.split("+")[0] == pins["torchvision"] and timm.__version__ == pins["timm"]
    assert torch.distributed.is_gloo_available()


def test_deepspeed_imports_with_an_accelerator():
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_accelerator().device_name() == expected, deepspeed.__version__


def test_dali_cpu_pipeline_decodes_real_jpegs(digits_root):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(digits_root / "val"), random_shuffle=False)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return fn.resize(images, resize_x=24, resize_y=24), labels

    p = pipe()
    p.build()
    images, labels = p.run()
    batch = np.stack([np.array(images.at(i)) for i in range(16)])
    assert batch.shape == (16, 24, 24, 3) and batch.dtype == np.uint8 and batch.std() > 10
    assert [int(np.array(labels.at(i))[0]) for i in range(16)] == [0] * 16  # sorted: class digit_0 first


def test_ffcv_writes_and_reads_a_beton(tmp_path, digits_root):
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter
    from PIL import Image

    files = sorted((digits_root / "val").glob("*/*.JPEG"))[:40]
    dataset = [(np.asarray(Image.open(f).convert("RGB")), int(f.parent.name[-1])) for f in files]
    path = tmp_path / "val.beton"
    DatasetWriter(str(path), {"image": RGBImageField(max_resolution=32), "label": IntField()},
                  num_workers=1).from_indexed_dataset(dataset)
    mean, std = np.array([0.5, 0.5, 0.5]) * 255, np.array([0.25, 0.25, 0.25]) * 255
    # The order that works on CPU (see shared notes: the usual order hangs without ToDevice).
    loader = Loader(str(path), batch_size=20, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines={
        "image": [RandomResizedCropRGBImageDecoder((16, 16)), RandomHorizontalFlip(),
                  NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()],
        "label": [IntDecoder(), ToTensor(), Squeeze()]})
    batches = list(loader)
    assert len(batches) == 2
    images, labels = batches[0]
    assert images.shape == (20, 3, 16, 16) and images.dtype == torch.float32
    assert labels.tolist() == [label for _, label in dataset[:20]]


def test_mlflow_local_store_round_trip(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("components", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric("loss", 1.0 / (s + 1), 0, s)
                                               for s in range(5)])
    client.set_terminated(run.info.run_id, "FINISHED")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("binary, flag", [("slurmctld", "-V"), ("slurmd", "-V"), ("sbatch", "--version"),
                                          ("srun", "--version"), ("scontrol", "--version"),
                                          ("munged", "--version")])
def test_slurm_and_munge_are_installed(binary, flag, tmp_path):
    path = shutil.which(binary) or shutil.which(f"/usr/sbin/{binary}")
    if path is None:
        pytest.skip(f"{binary} not installed (Debian packages slurm-wlm, munge)")
    # The clients read a config even for --version; a minimal one keeps them off DNS lookups.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=n1 NodeAddr=127.0.0.1\n"
                    "PartitionName=p Nodes=n1 Default=YES\n")
    result = subprocess.run([path, flag], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/usr/sbin:/bin", "SLURM_CONF": str(conf)})
    assert result.returncode == 0, result.stderr
    assert ("munge" if binary == "munged" else "slurm") in result.stdout.lower()
