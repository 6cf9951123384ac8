"""`ldr_tf.pretrained`: model names, what is shipped, and each shipped model on a real pair."""

import json

import numpy as np
import pytest

from ldr_tf import pretrained

SHIPPED = sorted(pretrained.installed())


def test_resolve_paths_and_names(tmp_path, monkeypatch):
    assert pretrained.resolve(tmp_path) == tmp_path
    assert str(pretrained.resolve("./brain")) == "brain"  # a folder called brain: written as a path
    monkeypatch.setattr(pretrained, "HERE", tmp_path)
    with pytest.raises(ValueError, match=r"--model=brain: the pretrained model is not in this installation"):
        pretrained.resolve("brain")
    (tmp_path / pretrained.MODELS["brain"]).mkdir()
    (tmp_path / pretrained.MODELS["brain"] / "saved_model.pb").write_bytes(b"")
    assert pretrained.resolve("brain") == tmp_path / pretrained.MODELS["brain"]
    assert pretrained.installed() == {"brain": tmp_path / pretrained.MODELS["brain"]}


def test_predict_names_a_missing_pretrained_model(tmp_path, monkeypatch, capsys):
    from ldr_tf import predict

    monkeypatch.setattr(pretrained, "HERE", tmp_path)
    img = tmp_path / "a.nii.gz"
    img.write_bytes(b"")
    rc = predict.run(["predict", "--model=brain", f"--fixed={img}", f"--moving={img}", f"--out_dir={tmp_path / 'o'}"])
    assert rc == 1
    assert "--model=brain: the pretrained model is not in this installation" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shipped_models_fit_the_package_budget():
    total = sum(f.stat().st_size for f in pretrained.HERE.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"ldr_tf/pretrained holds {total / 2**20:.1f} MB (limit 40 MB)"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_label_free_and_documented(name):
    meta = json.loads((pretrained.folder(name) / "ldr_tf_export.json").read_text())
    pre = meta["preprocessing"]
    assert pre["crop"] in ("foreground", "none"), "a shipped model must not need label maps to place its input"
    card = meta["card"]
    for key in ("summary", "data", "training", "scores", "intended_use", "limits"):
        assert card.get(key), f"model card of {name} lacks {key}"
    assert "/" not in meta["checkpoint"], "no paths of the training machine in a shipped model"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_runs_on_a_small_pair(name):
    """The model loads by name and gives a finite, modest flow on a pair on its grid; the same input twice gives the
    same output."""
    from ldr_tf.deploy.loader import open_registrar

    reg = open_registrar(name)
    d, h, w = reg.image_size
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (d, h, w)), indexing="ij")
    head = (z**2 / 0.7 + y**2 / 0.8 + x**2 / 0.6 < 1).astype(np.float32)
    core = ((z - 0.1) ** 2 / 0.1 + y**2 / 0.2 + x**2 / 0.15 < 1).astype(np.float32)
    fixed = (0.4 * head + 0.4 * core)[None, ..., None]
    moving = np.roll(fixed, 3, axis=2)
    out = reg(fixed, moving)
    assert out["flow"].shape == (1, d, h, w, 3) and np.isfinite(out["flow"]).all()
    assert np.abs(out["flow"]).max() < max(d, h, w) / 4
    again = reg(fixed, moving)
    np.testing.assert_array_equal(out["flow"], again["flow"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_brain_model_improves_a_real_pair(name, shared_data, tmp_path):
    """``predict --model=<name>`` on two raw IXI test-split heads, no label maps for the input: Dice rises."""
    if name != "brain":
        pytest.skip("not a brain model")
    from ldr_tf import predict

    t1, seg = shared_data / "ixi" / "t1", shared_data / "ixi" / "dlmuse_seg"
    fixed, moving = "IXI048-HH-1326", "IXI080-HH-1341"  # test split of the brain recipe
    out = tmp_path / "o"
    rc = predict.run(["predict", f"--model={name}", f"--fixed={t1 / (fixed + '_T1.nii.gz')}",
                      f"--moving={t1 / (moving + '_T1.nii.gz')}",
                      f"--fixed_seg={seg / (fixed + '_T1_DLMUSE.nii.gz')}",
                      f"--moving_seg={seg / (moving + '_T1_DLMUSE.nii.gz')}", f"--out_dir={out}"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert "labels" not in result["preprocessing"]["crop"]
    assert result["dice"] > result["dice_before"] + 0.1, (result["dice_before"], result["dice"])
    # --refine=auto (the default): the model's recommended refinement ran
    assert [lv["steps"] for lv in result["model"]["refine"]["levels"]] == [10] and result["seconds"]["refine"] > 0


def test_ship_a_run_as_a_pretrained_model(tmp_path, monkeypatch):
    """tools/ship_pretrained: the export lands in the package folder with the card and no paths of this machine;
    the previous version is replaced in one rename; the size limit is enforced."""
    from tests.helpers import make_run, student_network
    from tools import ship_pretrained

    monkeypatch.setattr(pretrained, "HERE", tmp_path / "pretrained")
    (tmp_path / "pretrained").mkdir()
    run = make_run(tmp_path / "run", student_network(), dataset={"path": "/home/me/data/brain.json"})
    card = {"summary": "test", "data": "d", "training": "t", "scores": {"dice": 0.5}, "intended_use": "u",
            "limits": "l"}
    dest = ship_pretrained.ship(str(run), "brain", card)
    assert dest == tmp_path / "pretrained" / "brain-student" and pretrained.resolve("brain") == dest
    meta = json.loads((dest / "ldr_tf_export.json").read_text())
    assert meta["card"] == card and meta["checkpoint"] == "ckpt-1" and "/home/me" not in json.dumps(meta)
    assert meta["training_data"]["path"] == "brain.json"
    ship_pretrained.ship(str(run), "brain", {**card, "summary": "v2"})  # replaces the first version
    assert pretrained.card("brain")["summary"] == "v2"
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == ["brain-student"]
    assert "refine" not in json.loads((dest / "ldr_tf_export.json").read_text())
    # an export (here the shipped model itself) is written again in the current format, keeping its card; --refine
    # records what predict --refine=auto applies, and a later re-export keeps it
    again = ship_pretrained.ship(str(dest), "brain", {}, refine=[10])
    meta = json.loads((again / "ldr_tf_export.json").read_text())
    assert meta["card"]["summary"] == "v2" and "reexported_from" not in meta and meta["checkpoint"] == "ckpt-1"
    assert meta["refine"]["steps"] == [10]
    again = ship_pretrained.ship(str(again), "brain", {})
    assert json.loads((again / "ldr_tf_export.json").read_text())["refine"]["steps"] == [10]
    with pytest.raises(ValueError, match="--step chooses a checkpoint"):
        ship_pretrained.ship(str(dest), "brain", {}, step=1)
    monkeypatch.setattr(ship_pretrained, "LIMIT_MB", 0.01)
    with pytest.raises(ValueError, match=r"would take .* MB \(limit 0 MB\)"):
        ship_pretrained.ship(str(run), "brain", card)
    assert pretrained.card("brain")["summary"] == "v2"  # the shipped model is untouched
