"""Every user error exits 2 with one message naming file, line (for data) and field - never a traceback."""
from pathlib import Path

import pytest
import yaml

from conftest import dpo_row, make_spec, run_cli, sft_row, write_jsonl


def check_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ")
    for n in needles:
        assert n in result.stderr, result.stderr


def edit_spec(spec_file: Path, fn) -> Path:
    data = yaml.safe_load(spec_file.read_text())
    fn(data)
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec_file


def test_valid_spec_passes(spec_file):
    r = run_cli("validate", str(spec_file))
    assert r.returncode == 0, r.stderr
    assert "alpha" in r.stdout and "approximate" in r.stdout


def test_yaml_syntax_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  name: tiny\n  path: [unclosed\nsft: {}\n")
    check_error(run_cli("validate", str(f)), str(f), "YAML syntax error")


def test_unknown_key_names_line_and_suggests(spec_file):
    text = spec_file.read_text() + "sft:\n  learnig_rate: 0.1\n"
    spec_file.write_text(text)
    line = len(text.splitlines())
    check_error(run_cli("validate", str(spec_file)), f"{spec_file}:{line}:", "sft.learnig_rate",
                "did you mean 'learning_rate'")


def test_wrong_type(spec_file):
    edit_spec(spec_file, lambda d: d.update(sft={"batch_size": "two"}))
    check_error(run_cli("validate", str(spec_file)), "sft.batch_size", "integer")


def test_value_out_of_range(spec_file):
    check_error(run_cli("plan", str(spec_file), "sft.learning_rate=-1"), "sft.learning_rate", "greater than 0")


def test_sequence_longer_than_context(spec_file):
    check_error(run_cli("plan", str(spec_file), "sft.max_seq_length=100000"), "sft.max_seq_length", "context")


@pytest.mark.parametrize("zones,needle", [
    ([{"name": "a", "layers": [0, 4], "modules": ["q_proj"]}, {"name": "b", "layers": [3, 7], "modules": ["v_proj"]}],
     "overlap"),
    ([{"name": "a", "layers": [0, 8], "modules": ["q_proj"]}], "outside"),
    ([{"name": "a", "layers": [0, 3], "modules": ["qkv_proj"]}], "unknown module 'qkv_proj'"),
])
def test_bad_zones(spec_file, zones, needle):
    edit_spec(spec_file, lambda d: d.update(lora={"zones": zones}))
    check_error(run_cli("validate", str(spec_file)), "lora.zones", needle)


@pytest.mark.parametrize("key", ["aws_secret_access_key", "token", "password", "wandb_api_key"])
def test_secret_looking_key_rejected(spec_file, key):
    edit_spec(spec_file, lambda d: d["storage"].update({key: "abc"}) if "storage" in d else d.update(storage={key: "x"}))
    check_error(run_cli("validate", str(spec_file)), f"storage.{key}", "secret")


def test_non_utf8_config(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    check_error(run_cli("validate", str(f)), str(f), "not UTF-8")


def test_unknown_hardware_profile(spec_file):
    check_error(run_cli("plan", str(spec_file), "hardware.profile=tpu-v9"), "hardware.profile", "known profiles")


def test_missing_topic_folder(spec_file):
    edit_spec(spec_file, lambda d: d["curriculum"].update(topics=["alpha", "gamma"]))
    check_error(run_cli("validate", str(spec_file)), "gamma", "curriculum.topics")


# ---- data files ---------------------------------------------------------------------------------


def data_error(spec_file, data_dir, kind, rows, *needles, line=None):
    path = write_jsonl(data_dir / "beta" / f"{kind}.jsonl", rows) if rows is not None else None
    result = run_cli("validate", str(spec_file))
    where = f"{path}:{line}:" if line else str(path)
    check_error(result, where, *needles)


def test_empty_file(spec_file, data_dir):
    (data_dir / "beta" / "sft.jsonl").write_text("\n")
    check_error(run_cli("validate", str(spec_file)), str(data_dir / "beta" / "sft.jsonl"), "empty")


def test_invalid_json_line(spec_file, data_dir):
    data_error(spec_file, data_dir, "sft", [sft_row(), '{"messages": [', sft_row()], "invalid JSON", line=2)


def test_missing_field(spec_file, data_dir):
    data_error(spec_file, data_dir, "sft", [sft_row(), {"conversation": []}], "'messages'", line=2)


def test_wrong_role(spec_file, data_dir):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    data_error(spec_file, data_dir, "sft", [row], "messages[1].role", "'bot'", line=1)


def test_empty_content(spec_file, data_dir):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}
    data_error(spec_file, data_dir, "sft", [sft_row(), sft_row(), row], "messages[1].content", "empty", line=3)


def test_conversation_without_assistant(spec_file, data_dir):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    data_error(spec_file, data_dir, "sft", [row], "no assistant turn", line=1)


def test_chosen_identical_to_rejected(spec_file, data_dir):
    row = dpo_row()
    row["rejected"] = row["chosen"]
    data_error(spec_file, data_dir, "dpo", [dpo_row(), row], "field 'rejected'", "identical", line=2)


def test_non_utf8_data(spec_file, data_dir):
    path = data_dir / "beta" / "sft.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}\n'
                     b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    check_error(run_cli("validate", str(spec_file)), f"{path}:2:", "not UTF-8")


def test_eval_item_answer_out_of_range(spec_file, data_dir):
    row = {"question": "q?", "choices": ["a", "b"], "answer": 2}
    data_error(spec_file, data_dir, "eval", [row], "field 'answer'", line=1)


def test_overlong_error_policy_names_the_example(tmp_path, data_dir):
    long = sft_row(a="word " * 400)
    write_jsonl(data_dir / "alpha" / "sft.jsonl", [sft_row(), long])
    spec = make_spec(tmp_path / "r.yaml", data_dir, sft={"max_seq_length": 64}, curriculum={"overlong": "error"})
    check_error(run_cli("validate", str(spec)), f"{data_dir / 'alpha' / 'sft.jsonl'}:2:", "sft.max_seq_length")


def test_overlong_drop_policy_counts(tmp_path, data_dir):
    write_jsonl(data_dir / "alpha" / "sft.jsonl", [sft_row(), sft_row(a="word " * 400), sft_row()])
    spec = make_spec(tmp_path / "r.yaml", data_dir, sft={"max_seq_length": 64})
    r = run_cli("validate", str(spec))
    assert r.returncode == 0, r.stderr
    cells = [c.strip() for c in next(l for l in r.stdout.splitlines() if "alpha" in l).split("│")[1:-1]]
    assert cells[0] == "alpha" and cells[1] == "2" and cells[8] == "1" and cells[-1] == "dropped"
    assert "1 example(s) affected" in r.stdout


def test_tracker_that_is_not_installed_is_named_before_ray_starts(spec_file):
    r = run_cli("train", str(spec_file), "report_to=[wandb]")
    if r.returncode == 2:
        assert "report_to names wandb" in r.stderr and "pip install wandb" in r.stderr
    else:  # wandb happens to be installed here: then it is not an error
        import importlib.util

        assert importlib.util.find_spec("wandb") is not None
