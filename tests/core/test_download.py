"""`ctscan data download`: unpacking and split writing on a local mirror; clean failure offline."""

from __future__ import annotations

import io
import socket
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from ctscan.data.dataset import CTDataset
from ctscan.data.download import download_dataset
from ctscan.errors import DataError


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_mirror(root: Path) -> Path:
    """A tiny copy of the UCSD-AI4H/COVID-CT layout: image archives and split lists."""
    (root / "Images-processed").mkdir(parents=True)
    for folder, split_folder, prefix in (("CT_COVID", "COVID", "c"), ("CT_NonCOVID", "NonCOVID", "n")):
        names = [f"{prefix}%{i}.png" for i in range(6)]
        with zipfile.ZipFile(root / "Images-processed" / f"{folder}.zip", "w") as bundle:
            for index, name in enumerate(names):
                bundle.writestr(f"{folder}/{name}", _png(index * 10))
            bundle.writestr("__MACOSX/._junk.png", b"junk")
        split_dir = root / "Data-split" / split_folder
        split_dir.mkdir(parents=True)
        for split, chosen in (("train", names[:3]), ("val", names[3:4]), ("test", names[4:])):
            (split_dir / f"{split}{folder}.txt").write_text("\n".join(chosen) + "\n")
    return root


def test_download_from_a_mirror_writes_the_project_layout(tmp_path: Path) -> None:
    mirror = make_mirror(tmp_path / "mirror")
    result = download_dataset(tmp_path / "data", base_url=str(mirror))
    assert result["images"] == 12
    dataset = CTDataset(tmp_path / "data")
    assert dataset.counts() == {"train": {"covid": 3, "non_covid": 3}, "val": {"covid": 1, "non_covid": 1},
                                "test": {"covid": 2, "non_covid": 2}}
    assert dataset.verify_checksums() == 12
    assert not (tmp_path / "data" / "CT_COVID" / "._junk.png").exists()


def test_split_list_naming_a_missing_image_fails(tmp_path: Path) -> None:
    mirror = make_mirror(tmp_path / "mirror")
    (mirror / "Data-split" / "COVID" / "testCT_COVID.txt").write_text("ghost.png\n")
    with pytest.raises(DataError, match="ghost.png"):
        download_dataset(tmp_path / "data", base_url=str(mirror))


def test_unreachable_network_fails_with_a_message(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match="cannot download .*Check the network"):
        download_dataset(tmp_path / "data", base_url=f"http://127.0.0.1:{port}/COVID-CT")


def test_refuses_to_write_over_an_existing_dataset(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(DataError, match="already holds a dataset"):
        download_dataset(data_dir, base_url=str(tmp_path))
