"""The `v2flow` command on a first contact: every command is listed, and bad input gets the package's own
error (exit code 2, one line naming the problem and the fix), never a traceback or silent conversion."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from v2flow import V2FlowTokenizer
from v2flow.cli import LIGHTNING_SUBCOMMANDS, TASKS, TOOL_COMMANDS, main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny tokenizer for 8x8 grey images that knows its (dark) training data."""
    from v2flow.checks import image_features, input_statistics
    from v2flow.testing import tiny_tokenizer

    tok = tiny_tokenizer(decode={"num_steps": 2, "shift": 2.0})
    train = -0.8 + 0.3 * torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    tok.config["input_statistics"] = input_statistics(image_features(train), "dark 8x8 test images")
    return tok.save_pretrained(tmp_path_factory.mktemp("tok") / "tok")


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in (*LIGHTNING_SUBCOMMANDS, *TASKS, *TOOL_COMMANDS):
        assert command in out
    err = _error(capsys, ["frobnicate"])
    assert "unknown command 'frobnicate'" in err and "cache-latents" in err and "classifier" in err


def test_task_help_names_the_task(capsys):
    with pytest.raises(SystemExit):
        main(["lm", "fit", "--help"])
    assert "v2flow lm [options] fit" in capsys.readouterr().out


def test_lightning_commands_do_not_warn_about_args(recwarn):
    with pytest.raises(SystemExit):
        main(["classifier", "fit", "--config", "configs/classifier_mnist.yaml", "--print_config"])
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_decode_errors(tmp_path, capsys, tok_dir):
    tok = V2FlowTokenizer.from_pretrained(tok_dir)
    ids = tok.encode(-0.8 + 0.3 * torch.rand(2, 1, 8, 8)).ids
    (tmp_path / "ids.json").write_text(json.dumps({"ids": ids.tolist()}))
    (tmp_path / "noids.json").write_text(json.dumps({"files": ["a.png"]}))
    (tmp_path / "short.json").write_text(json.dumps({"ids": ids[:, :2].tolist()}))
    out = str(tmp_path / "out")
    base = ["decode", str(tok_dir)]
    assert "shift must be > 0" in _error(capsys, [*base, str(tmp_path / "ids.json"), "-o", out, "--shift", "0"])
    assert "holds no 'ids' entry" in _error(capsys, [*base, str(tmp_path / "noids.json"), "-o", out])
    err = _error(capsys, [*base, str(tmp_path / "short.json"), "-o", out])
    assert "If they come from another tokenizer" in err and "--allow-truncation" in err
    assert main([*base, str(tmp_path / "short.json"), "-o", out, "--allow-truncation"]) == 0
    # the checkpoint's default shift 2 does not make dopri5 fail; an explicit one does, with a reason
    assert main([*base, str(tmp_path / "ids.json"), "-o", out, "--solver", "dopri5"]) == 0
    err = _error(capsys, [*base, str(tmp_path / "ids.json"), "-o", out, "--solver", "dopri5", "--shift", "2"])
    assert "dopri5 is adaptive" in err
    if not torch.cuda.is_available():
        err = _error(capsys, [*base, str(tmp_path / "ids.json"), "-o", out, "--device", "cuda"])
        assert "no usable CUDA device" in err and "--device cpu" in err
    assert "not a device name" in _error(capsys, [*base, str(tmp_path / "ids.json"), "-o", out, "--device", "gpu"])


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    err = _error(capsys, ["export", "README.md", str(tmp_path / "x")])
    assert "README.md is not a Lightning checkpoint" in err and "last.ckpt" in err
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    assert "no state_dict" in _error(capsys, ["export", str(tmp_path / "plain.pt"), str(tmp_path / "x")])


def test_images_are_never_converted_silently(tmp_path, capsys, tok_dir):
    digit = np.zeros((6, 6), np.uint8)
    digit[2:4, 1:5] = 255
    _png(tmp_path / "small" / "a.png", digit)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    _png(tmp_path / "colour" / "c.png", colour)
    out = str(tmp_path / "ids.json")
    err = _error(capsys, ["encode", str(tok_dir), str(tmp_path / "small"), "-o", out])
    assert "is 6x6 but the tokenizer expects 8x8; pass --pad" in err
    assert main(["encode", str(tok_dir), str(tmp_path / "small"), "-o", out, "--pad"]) == 0
    err = _error(capsys, ["encode", str(tok_dir), str(tmp_path / "colour"), "-o", out])
    assert "is a colour image but a 1-channel (grey) image is wanted" in err and "--convert" in err
    assert main(["encode", str(tok_dir), str(tmp_path / "colour"), "-o", out, "--convert"]) == 0
    assert "choose one" in _error(
        capsys, ["encode", str(tok_dir), str(tmp_path / "small"), "-o", out, "--pad", "--resize"]
    )


def test_padding_matches_the_training_digits():
    from v2flow.data import load_mnist
    from v2flow.images import pad_to_size

    padded, _ = load_mnist("test", pad_to=32)
    raw, _ = load_mnist("test", pad_to=28)
    assert torch.equal(pad_to_size(raw[0], 32), padded[0])
    with pytest.raises(ValueError, match="larger; resize it instead"):
        pad_to_size(padded[0], 28)


def test_off_distribution_files_warn(tmp_path, tok_dir):
    bright = np.full((8, 8), 230, np.uint8)  # white background: the training images are dark
    for i in range(3):
        _png(tmp_path / "bright" / f"{i}.png", bright)
    with pytest.warns(UserWarning, match="3 of 3 images look unlike .*dark 8x8 test images"):
        assert main(["encode", str(tok_dir), str(tmp_path / "bright"), "-o", str(tmp_path / "ids.json")]) == 0


def test_calibrate_writes_statistics_atomically(tmp_path, capsys, tok_dir):
    import shutil

    target = tmp_path / "tok"
    shutil.copytree(tok_dir, target)
    weights = (target / "model.safetensors").read_bytes()
    for i in range(4):
        _png(tmp_path / "imgs" / f"{i}.png", np.arange(64).reshape(8, 8) * (i + 1))
    assert main(["calibrate", str(target), "--data", str(tmp_path / "imgs"), "--description", "grey squares"]) == 0
    stats = json.loads((target / "config.json").read_text())["input_statistics"]
    assert stats["num_images"] == 4 and stats["data"] == "grey squares"
    assert (target / "model.safetensors").read_bytes() == weights  # only config.json is rewritten
    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.png", np.full((8, 8), 100, np.uint8))
    assert "all have the same" in _error(capsys, ["calibrate", str(target), "--data", str(tmp_path / "flat")])
    assert V2FlowTokenizer.from_pretrained(target).config["input_statistics"] == stats
