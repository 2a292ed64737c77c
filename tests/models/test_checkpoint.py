import json

import pytest
import torch

from models.core.budget import CalibrationTable
from models.core.checkpoint import MANIFEST, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from models.networks.densenet import acs_densenet40
from tests.conftest import randomize_bn

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = randomize_bn(acs_densenet40(gate="cheap")).eval()
    table = model.table
    model.table = CalibrationTable(table.budgets, table.taus, table.counts, table.floor,
                                   "test", {"images": 0})
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path, name="tiny", classes=CLASSES,
                    accuracy=[{"budget": 1.0, "policy": "threshold", "top1": None}],
                    provenance={"trained": False})
    return model, path


def test_round_trip(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, budget=0.4), model(x, budget=0.4))
    assert loaded.model.table == model.table
    manifest = loaded.manifest
    assert manifest["name"] == loaded.name == "tiny"
    assert manifest["classes"] == CLASSES
    assert manifest["architecture"] == "densenet"
    assert manifest["config"]["gate"] == "cheap"
    assert manifest["input"]["size"] == 32 and len(manifest["input"]["mean"]) == 3
    assert manifest["accuracy"][0]["budget"] == 1.0
    assert manifest["provenance"] == {"trained": False}
    assert manifest["calibration"]["floor"] == pytest.approx(model.floor())
    assert len(manifest["weights"]["sha256"]) == 64


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in (MANIFEST, WEIGHTS):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_manifest(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_tampered_weights_are_detected(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "t")
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize("change,match", [
    (lambda m: m["config"].update(growth=16), "do not fit"),
    (lambda m: m["config"].update(depth=3), "unknown densenet config keys"),
    (lambda m: m.update(architecture="vgg"), "unknown architecture"),
    (lambda m: m.update(classes=["a", "b"]), "2 classes"),
    (lambda m: m.pop("calibration"), "missing fields"),
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m["calibration"].update(taus=m["calibration"]["taus"][::-1]), "tau"),
])
def test_manifest_that_does_not_match_is_a_clear_error(saved, tmp_path, change, match):
    path = copy_checkpoint(saved[1], tmp_path / "t")
    edit_manifest(path, change)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_or_broken_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match="no manifest"):
        load_checkpoint(tmp_path)
    path = copy_checkpoint(saved[1], tmp_path / "t")
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    path = copy_checkpoint(saved[1], tmp_path / "u")
    (path / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="weights file missing"):
        load_checkpoint(path)


def test_weights_are_safetensors_not_pickle(saved):
    header = (saved[1] / WEIGHTS).read_bytes()[:8]
    assert int.from_bytes(header, "little") > 0  # safetensors: a little-endian header length
    assert not (saved[1] / WEIGHTS).read_bytes().startswith(b"\x80")  # no pickle protocol
