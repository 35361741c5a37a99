"""make_shards: image folders (sidecar / JSON / CSV captions) and tencent's JSON -> readable shards."""

import csv
import json
import os
import subprocess
import sys
import tarfile

import pytest

from ipadapter_jax.data.synthetic import encode_image, random_image
from ipadapter_jax.data.tar_samples import iter_shard_samples
from ipadapter_jax.data.make_shards import main


@pytest.fixture()
def image_folder(tmp_path):
    """7 images (jpg/png/webp, one in a subfolder), one corrupt file, one image without a caption."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    names = ["a.jpg", "b.png", "c.webp", "d.jpeg", "e.jpg", "sub/f.jpg", "sub/g.png"]
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
    for i, name in enumerate(names):
        (root / name).write_bytes(encode_image(random_image(16, 20 + i, i), formats[name.rsplit(".", 1)[1]]))
        (root / name).with_suffix(".txt").write_text(f"caption {i}\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "broken.txt").write_text("broken")
    (root / "nocaption.png").write_bytes(encode_image(random_image(16, 16, 9), "PNG"))
    return root, names


def _read_all(out_dir):
    shards = sorted(os.listdir(out_dir))
    samples = [s for shard in shards for s in iter_shard_samples(os.path.join(out_dir, shard))]
    return shards, samples


def test_sidecar_captions(image_folder, tmp_path, capsys):
    root, names = image_folder
    out = tmp_path / "shards"
    assert main(["--images", str(root), "--out", str(out), "--samples-per-shard", "3"]) == 0
    shards, samples = _read_all(out)
    assert shards == ["00000.tar", "00001.tar", "00002.tar"]
    assert [len(list(iter_shard_samples(str(out / s)))) for s in shards] == [3, 3, 1]
    assert [s["txt"].decode() for s in samples] == [f"caption {i}" for i in range(7)]
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    # Original bytes are stored under the extension of the real format.
    for sample, name in zip(samples, names):
        ext = {"jpeg": "jpg"}.get(name.rsplit(".", 1)[1], name.rsplit(".", 1)[1])
        assert sample[ext] == (root / name).read_bytes()
        meta = json.loads(sample["json"])
        assert meta["caption"] == sample["txt"].decode() and meta["source"].endswith(name)
    report = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--images", str(root), "--out", str(out)])  # refuses to mix with existing shards
    assert "wrote 7 samples into 3 shard(s)" in report
    assert "skipped 1 (undecodable_image)" in report and "broken.jpg" in report
    assert "skipped 1 (missing_caption)" in report and "nocaption.png" in report


def test_captions_json_and_csv(image_folder, tmp_path):
    root, _ = image_folder
    as_dict = {"a.jpg": "json a", "sub/f.jpg": "json f", "broken.jpg": "bad", "missing.jpg": "gone"}
    (tmp_path / "caps.json").write_text(json.dumps(as_dict))
    assert main(["--images", str(root), "--captions", str(tmp_path / "caps.json"), "--out", str(tmp_path / "j")]) == 0
    assert [s["txt"].decode() for s in _read_all(tmp_path / "j")[1]] == ["json a", "json f"]

    records = [{"image_file": "b.png", "text": "list b"}, {"file": "c.webp", "caption": "list c"}]
    (tmp_path / "caps_list.json").write_text(json.dumps(records))
    assert main(["--images", str(root), "--captions", str(tmp_path / "caps_list.json"), "--out", str(tmp_path / "l")]) == 0
    samples = _read_all(tmp_path / "l")[1]
    assert [s["txt"].decode() for s in samples] == ["list b", "list c"] and "webp" in samples[1]

    with open(tmp_path / "caps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        writer.writerow(["d.jpeg", "csv d, with comma"])
        writer.writerow(["sub/g.png", "csv g"])
    assert main(["--images", str(root), "--captions", str(tmp_path / "caps.csv"), "--out", str(tmp_path / "c")]) == 0
    assert [s["txt"].decode() for s in _read_all(tmp_path / "c")[1]] == ["csv d, with comma", "csv g"]


def test_tencent_json_via_python_dash_m(image_folder, tmp_path):
    root, _ = image_folder
    records = [{"image_file": "a.jpg", "text": "t a"}, {"image_file": "broken.jpg", "text": "t broken"},
               {"image_file": "sub/g.png", "text": "t g"}, {"image_file": "e.jpg", "text": "t e"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "tencent"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "ipadapter_jax.data.make_shards", "--tencent-json", str(tmp_path / "data.json"),
         "--image-root", str(root), "--out", str(out), "--samples-per-shard", "2", "--shuffle", "--seed", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 3 samples into 2 shard(s)" in result.stdout and "broken.jpg" in result.stdout
    shards, samples = _read_all(out)
    assert shards == ["00000.tar", "00001.tar"]
    assert sorted(s["txt"].decode() for s in samples) == ["t a", "t e", "t g"]
    with tarfile.open(out / "00000.tar") as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_nothing_usable_writes_nothing_and_fails(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"junk")
    (tmp_path / "in" / "x.txt").write_text("x")
    assert main(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 1
    assert os.listdir(tmp_path / "out") == []
    assert "wrote 0 samples" in capsys.readouterr().out


def test_an_interrupted_run_leaves_only_whole_shards(image_folder, tmp_path, monkeypatch):
    import ipadapter_jax.data.make_shards as make_shards

    root, _ = image_folder
    decode, calls = make_shards.decode_image, []

    def decode_then_stop(data, **kwargs):  # killed at the second image of the second shard (broken.jpg is 3rd)
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return decode(data, **kwargs)

    monkeypatch.setattr(make_shards, "decode_image", decode_then_stop)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        main(["--images", str(root), "--out", str(out), "--samples-per-shard", "3"])
    assert sorted(os.listdir(out)) == ["00000.tar"]  # the second shard was being written: no trace of it
    assert [s["txt"].decode() for s in iter_shard_samples(str(out / "00000.tar"))] == [f"caption {i}" for i in range(3)]
