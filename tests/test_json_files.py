"""internvl_plugin.json_files: a config file's every failure is one line naming the file, and the CLIs keep it."""

import pytest
from click.testing import CliRunner

from internvl_plugin.json_files import JsonFileError, read_json_object


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b'{"architectures": [', "not valid JSON (Expecting value: line 1 column 20"),
    (b"\xff\xfe{}", "not valid JSON ('utf-8' codec can't decode byte 0xff"),
    (b"[1, 2]", "not a JSON object"),
])
def test_each_failure_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(JsonFileError) as info:
        read_json_object(path)
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)
    assert info.value.missing == (content is None)


def test_a_folder_in_place_of_the_file_is_one_line(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(JsonFileError, match=r"config.json: cannot read \(Is a directory\)$"):
        read_json_object(tmp_path / "config.json")


def test_an_object_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "internvl_chat", "n": 2}')
    assert read_json_object(tmp_path / "config.json") == {"model_type": "internvl_chat", "n": 2}


def test_serve_and_estimate_use_it(tmp_path):
    from awq_tools.cli import main as awq_main
    from hub_cli.serve import UsageError, _read_config

    with pytest.raises(UsageError, match=f"^{tmp_path} has no config.json; is it a model folder\\?$"):
        _read_config(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(UsageError, match=r"config.json: not a JSON object$"):
        _read_config(tmp_path)
    res = CliRunner().invoke(awq_main, ["estimate", str(tmp_path)])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [f"Error: {tmp_path / 'config.json'}: not a JSON object"]
