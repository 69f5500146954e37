"""Every user error exits 2 with one message naming file, line (for data) and field - never a traceback."""

import json
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
    check_error(
        run_cli("validate", str(spec_file)), f"{spec_file}:{line}:", "sft.learnig_rate", "did you mean 'learning_rate'"
    )


def test_wrong_type(spec_file):
    edit_spec(spec_file, lambda d: d.update(sft={"batch_size": "two"}))
    check_error(run_cli("validate", str(spec_file)), "sft.batch_size", "integer")


def test_value_out_of_range(spec_file):
    check_error(run_cli("plan", str(spec_file), "sft.learning_rate=-1"), "sft.learning_rate", "greater than 0")


def test_sequence_longer_than_context(spec_file):
    check_error(run_cli("plan", str(spec_file), "sft.max_seq_length=100000"), "sft.max_seq_length", "context")


@pytest.mark.parametrize(
    "zones,needle",
    [
        (
            [
                {"name": "a", "layers": [0, 4], "modules": ["q_proj"]},
                {"name": "b", "layers": [3, 7], "modules": ["v_proj"]},
            ],
            "overlap",
        ),
        ([{"name": "a", "layers": [0, 8], "modules": ["q_proj"]}], "outside"),
        ([{"name": "a", "layers": [0, 3], "modules": ["qkv_proj"]}], "unknown module 'qkv_proj'"),
    ],
)
def test_bad_zones(spec_file, zones, needle):
    edit_spec(spec_file, lambda d: d.update(lora={"zones": zones}))
    check_error(run_cli("validate", str(spec_file)), "lora.zones", needle)


@pytest.mark.parametrize("key", ["aws_secret_access_key", "token", "password", "wandb_api_key"])
def test_secret_looking_key_rejected(spec_file, key):
    edit_spec(
        spec_file, lambda d: d["storage"].update({key: "abc"}) if "storage" in d else d.update(storage={key: "x"})
    )
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
    path.write_bytes(
        b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}\n'
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    )
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
    cells = [c.strip() for c in next(line for line in r.stdout.splitlines() if "alpha" in line).split("│")[1:-1]]
    assert cells[0] == "alpha" and cells[1] == "2" and cells[8] == "1" and cells[-1] == "dropped"
    assert "1 example(s) affected" in r.stdout


def test_tracker_that_is_not_installed_is_named_before_ray_starts(spec_file):
    r = run_cli("train", str(spec_file), "report_to=[wandb]")
    if r.returncode == 2:
        assert "report_to names wandb" in r.stderr and "pip install wandb" in r.stderr
    else:  # wandb happens to be installed here: then it is not an error
        import importlib.util

        assert importlib.util.find_spec("wandb") is not None


# ---- hostile or careless input: YAML ------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text,needle",
    [
        (billion_laughs() + "curriculum: {topics: [alpha], data_dir: *a8}\n", "expands to more than"),
        ("curriculum: &c {topics: [alpha], extra: *c}\n", "recursive alias"),
        ("curriculum: {topics: [alpha]}\nsft: {batch_size: 2}\nsft: {batch_size: 4}\n", "key 'sft' is given twice"),
        ("curriculum: " + "[" * 2000 + "]" * 2000 + "\n", "nested more than"),
        ("", "empty"),
        ("- model: tiny\n- sft: {}\n", "YAML mapping"),
    ],
)
def test_hostile_spec_yaml_is_refused_quickly(tmp_path, text, needle):
    f = tmp_path / "spec.yaml"
    f.write_text(text)
    check_error(run_cli("validate", str(f), timeout=60), str(f), needle)


def test_aliases_in_an_override_value_are_bounded(spec_file):
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    check_error(
        run_cli("plan", str(spec_file), f"curriculum.system_prompt=[{', '.join(levels)}]", timeout=60),
        "curriculum.system_prompt",
        "expands to more than",
    )


def test_persona_yaml_uses_the_same_bounded_loader(spec_file, data_dir):
    (data_dir / "persona.yaml").write_text(billion_laughs() + "lexicon: *a8\n")
    check_error(run_cli("validate", str(spec_file), timeout=60), str(data_dir / "persona.yaml"), "expands to more than")


@pytest.mark.parametrize(
    "persona,needle",
    [
        ("- cycle low\n- hedges\n", "must be a mapping"),
        ("lexicon: ['cycle low', '  ']\nvoice_markers: {hedges: [I think]}\n", "lexicon"),
        ("lexicon: [cycle low]\nvoice_markers: {hedges: ['']}\n", "voice_markers"),
    ],
)
def test_persona_of_the_wrong_shape(spec_file, data_dir, persona, needle):
    (data_dir / "persona.yaml").write_text(persona)
    check_error(run_cli("validate", str(spec_file)), str(data_dir / "persona.yaml"), needle)


def test_model_config_uses_the_bounded_loader(tmp_path):
    from mindprint_ray.errors import UserError
    from mindprint_ray.planning.model_config import load_model_config

    f = tmp_path / "model.yaml"
    f.write_text(billion_laughs() + "name: qwen-7b\nlora: {zones: *a8}\n")
    with pytest.raises(UserError, match="expands to more than") as e:
        load_model_config(f)
    assert e.value.file == str(f)
    f.write_text("name: my-model\narchitecture: {hidden_size: wide}\n")
    with pytest.raises(UserError, match="positive integer") as e:
        load_model_config(f)
    assert e.value.field == "architecture.hidden_size"


@pytest.mark.parametrize(
    "prices,needle",
    [
        (billion_laughs() + "prices: *a8\n", "expands to more than"),
        ("prices:\n  cpu: {on_demand: .nan, spot: 0, source: x, date: '2025'}\n", "prices.cpu.on_demand"),
        ("prices:\n  cpu: {on_demand: 1, spot: .inf, source: x, date: '2025'}\n", "prices.cpu.spot"),
        ("- not a mapping\n", "prices:"),
    ],
)
def test_price_override_file_is_checked(spec_file, tmp_path, prices, needle):
    f = tmp_path / "prices.yaml"
    f.write_text(prices)
    check_error(
        run_cli("report", str(spec_file), "--prices", str(f), "--out", str(tmp_path / "r"), timeout=60), str(f), needle
    )


def test_runtime_env_of_the_wrong_shape(spec_file, tmp_path):
    env = tmp_path / "runtime_env.yaml"
    env.write_text("excludes: runs/\n")
    check_error(
        run_cli(
            "preflight", str(spec_file), f"storage.path={tmp_path / 'runs'}", "--no-gpus", "--runtime-env", str(env)
        ),
        str(env),
        "excludes",
    )


def test_working_dir_that_is_a_file(spec_file, tmp_path):
    check_error(
        run_cli(
            "preflight",
            str(spec_file),
            f"storage.path={tmp_path / 'runs'}",
            "--no-gpus",
            "--working-dir",
            str(spec_file),
        ),
        "--working-dir",
        "not a folder",
    )


# ---- run names ------------------------------------------------------------------------------------------


BAD_NAMES = ["../x", "/tmp/abs", "a/b", "..", "-rf", "a..b", "x" * 101, "white space", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_run_name_in_the_spec(spec_file, name):
    check_error(run_cli("validate", str(spec_file), f"name='{name}'"), "field 'name'", "run name")


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "-rf", "a/b", ""])
def test_bad_run_name_on_the_command_line_stops_before_anything_runs(spec_file, tmp_path, name):
    storage = tmp_path / "storage"
    for command in (["train"], ["sweep"]):
        r = run_cli(*command, str(spec_file), f"storage.path={storage}", "--name", name, timeout=60)
        check_error(r, "--name", "run name")
    assert not storage.exists()


def test_bad_run_name_of_the_mlx_entry_point(spec_file, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "local_mlx", "train", str(spec_file), f"storage.path={tmp_path}", "--name", "../escape"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    check_error(r, "--name", "run name")
    assert not (tmp_path.parent / "escape").exists()


def test_spec_file_whose_name_cannot_name_the_run(tmp_path, data_dir):
    spec = yaml.safe_load(make_spec(tmp_path / "r.yaml", data_dir).read_text())
    del spec["name"]
    f = tmp_path / "my run.yaml"
    f.write_text(yaml.safe_dump(spec))
    check_error(run_cli("validate", str(f)), str(f), "field 'name'", "--name")


def test_run_name_rule_holds_for_the_facade_and_the_run_folder(tmp_path):
    from mindprint_ray.errors import UserError
    from mindprint_ray.facade import DPOPipeline
    from mindprint_ray.planning.model_config import get_model_config
    from mindprint_ray.runs.run_folder import RunFolder

    with pytest.raises(UserError, match="run name"):
        DPOPipeline(get_model_config("tiny")).train_topics(["alpha"], str(tmp_path), str(tmp_path / "out"), "../../x")
    assert not list(tmp_path.rglob("*.spec.yaml"))
    for name in ("../x", "/etc", "a\0b"):
        with pytest.raises(UserError, match="run name"):
            RunFolder.for_storage(str(tmp_path), name)


# ---- credentials in URLs ----------------------------------------------------------------------------------


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "override",
    [
        f"storage.path=s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@my-bucket/runs",
        f"ray.address=ray://admin:{SECRET}@head.example.com:10001",
        f"curriculum.data_dir=s3://user:{SECRET}@my-bucket/data",
        f"model.path=https://user:{SECRET}@huggingface.co/org/model",
        f"storage.path=s3://my-bucket/runs?X-Amz-Signature={SECRET}",
    ],
)
def test_credentials_in_a_url_are_refused_without_echoing_them(spec_file, override):
    r = run_cli("validate", str(spec_file), override)
    check_error(r, override.split("=")[0], "credentials")
    assert SECRET not in r.stderr + r.stdout and "AKIAIOSFODNN7EXAMPLE" not in r.stderr + r.stdout


def test_credentials_in_a_url_in_the_file_name_the_line(spec_file):
    text = spec_file.read_text() + f"ray:\n  address: http://admin:{SECRET}@10.0.0.1:8265\n"
    spec_file.write_text(text)
    r = run_cli("plan", str(spec_file))
    check_error(r, f"{spec_file}:{len(text.splitlines())}:", "ray.address", "credentials")
    assert SECRET not in r.stderr + r.stdout


def test_nul_character_in_a_value(spec_file):
    edit_spec(spec_file, lambda d: d["curriculum"].update(data_dir=d["curriculum"]["data_dir"] + "\0/etc"))
    check_error(run_cli("validate", str(spec_file)), str(spec_file), "curriculum.data_dir", "NUL")


# ---- S3 bucket names, checked before any network call -----------------------------------------------------


@pytest.mark.parametrize(
    "uri,needle",
    [
        ("s3://My-Bucket/runs", "lower-case"),
        ("s3://my_bucket/runs", "lower-case"),
        ("s3://ab/runs", "3 to 63"),
        ("s3://" + "a" * 64 + "/runs", "3 to 63"),
        ("s3://192.168.10.1/runs", "IP address"),
        ("s3://my..bucket/runs", "adjacent periods"),
        ("s3://-bucket/runs", "begin and end"),
        ("s3://xn--bucket/runs", "reserves"),
        ("s3://", "no bucket"),
        ("s3://my-bucket/../../etc", "'..'"),
    ],
)
@pytest.mark.parametrize("field", ["storage.path", "curriculum.data_dir"])
def test_bucket_names_s3_would_reject(spec_file, uri, needle, field):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    check_error(run_cli("validate", str(spec_file), f"{field}={uri}", env=env, timeout=60), field, needle)


# ---- model.path -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./no-such-model", "/no/such/model", "../no-such-model", "~/no-such-model-xyz"])
def test_local_model_path_that_does_not_exist(spec_file, path):
    check_error(
        run_cli("plan", str(spec_file), "model.name=qwen2.5-0.5b", f"model.path={path}"), "model.path", "does not exist"
    )


def test_model_path_that_is_a_file_or_has_no_config(spec_file, tmp_path):
    check_error(
        run_cli("plan", str(spec_file), "model.name=qwen2.5-0.5b", f"model.path={spec_file}"),
        "model.path",
        "not a model folder",
    )
    (tmp_path / "empty-model").mkdir()
    check_error(
        run_cli("plan", str(spec_file), "model.name=qwen2.5-0.5b", f"model.path={tmp_path / 'empty-model'}"),
        "model.path",
        "no config.json",
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.name=qwen2.5-0.5b", "model.path=Qwen/Qwen2.5-0.5B-Instruct", "hardware.profile=1xh100-80gb"],
        ["model.name=tiny", "model.path=./no-tiny-yet"],
        ["model.name=smollm2-135m", "model.path=./no-smollm2-yet"],
    ],
)
def test_hub_ids_and_models_built_on_first_use_pass(spec_file, overrides):
    r = run_cli("plan", str(spec_file), *overrides)
    assert r.returncode == 0, r.stderr


def test_broken_config_json_of_a_local_model(spec_file, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64')
    check_error(
        run_cli("plan", str(spec_file), "model.name=my-model", f"model.path={model}"),
        str(model / "config.json"),
        "JSON",
    )
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    check_error(
        run_cli("plan", str(spec_file), "model.name=my-model", f"model.path={model}"),
        "model.path",
        "num_attention_heads",
    )


# ---- numbers and overrides ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,field",
    [
        ("sft.learning_rate=.nan", "sft.learning_rate"),
        ("dpo.learning_rate=.inf", "dpo.learning_rate"),
        ("dpo.beta=.inf", "dpo.beta"),
        ("sft.max_grad_norm=.inf", "sft.max_grad_norm"),
        ("lora.alpha=.nan", "lora.alpha"),
        ("eval.weights={markers: .nan, lexicon: 1}", "eval.weights.markers"),
        ("sft.epochs_per_topic=1.0e+308", "sft.epochs_per_topic"),
        ("sft.batch_size=" + "9" * 30, "sft.batch_size"),
        ("hardware.num_workers=-1", "hardware.num_workers"),
        ("dpo.steps_per_topic=0", "dpo.steps_per_topic"),
        ("seed=-1", "seed"),
    ],
)
def test_numbers_out_of_range_or_not_finite(spec_file, override, field):
    check_error(run_cli("plan", str(spec_file), override), f"field '{field}'")


def test_huge_gradient_accumulation_plans_quickly(spec_file):
    r = run_cli("plan", str(spec_file), "sft.gradient_accumulation=1000000000", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "lower sft.gradient_accumulation" in r.stdout or "raise sft.epochs_per_topic" in r.stdout


@pytest.mark.parametrize(
    "override,needle",
    [
        ("a..b=1", "empty part"),
        ("=1", "empty part"),
        ("sft.=1", "empty part"),
        ("no_equals_sign", "key.path=value"),
        ("__class__=x", "unknown key '__class__'"),
        ("nosuch.section=1", "unknown key 'nosuch'"),
        ("curriculum.topics.first=alpha", "'topics' is not a section"),
        ("sft=3", "field 'sft'"),
    ],
)
def test_malformed_overrides(spec_file, override, needle):
    check_error(run_cli("plan", str(spec_file), override), needle)


def test_override_into_an_empty_section(spec_file):
    spec_file.write_text(spec_file.read_text() + "sft:\n")
    r = run_cli("plan", str(spec_file), "sft.batch_size=2", "--json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("topic", ["../etc", "a/b", "-x", "t" * 101])
def test_bad_topic_names(spec_file, topic):
    check_error(run_cli("validate", str(spec_file), f"curriculum.topics=['{topic}']"), "curriculum.topics")


def test_eval_topics_are_names(spec_file):
    check_error(run_cli("eval", str(spec_file), "--topics", "alpha,../../etc"), "--topics")


# ---- data files: enormous or deeply nested lines ------------------------------------------------------------


def test_enormous_jsonl_line(spec_file, data_dir):
    path = data_dir / "beta" / "sft.jsonl"
    path.write_text(json.dumps(sft_row()) + "\n" + '{"messages": "' + "x" * (9 * 1024 * 1024) + '"}\n')
    check_error(run_cli("validate", str(spec_file)), f"{path}:2:", "longer than")


@pytest.mark.parametrize(
    "line,needle",
    [
        ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"messages": ' + "9" * 5000 + "}", "invalid JSON value"),
    ],
)
def test_jsonl_line_python_cannot_parse(spec_file, data_dir, line, needle):
    path = data_dir / "beta" / "sft.jsonl"
    path.write_text(json.dumps(sft_row()) + "\n" + line + "\n")
    check_error(run_cli("validate", str(spec_file)), f"{path}:2:", needle)


# ---- adapter folders and output paths ------------------------------------------------------------------------


def peft_adapter(folder: Path, config: object = None, weights: bytes | None = None) -> Path:
    """A small PEFT adapter folder (one LoRA module), optionally with a given config or weight bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]} if config is None else config
    (folder / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if weights is None:
        save_file(
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 8), np.float32),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((8, 2), np.float32),
            },
            str(folder / "adapter_model.safetensors"),
        )
    else:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.mark.parametrize("kind", ["missing", "file", "config_list", "config_not_json", "no_weights"])
def test_eval_adapter_that_is_not_an_adapter(spec_file, tmp_path, kind):
    target = tmp_path / "adapter"
    if kind == "file":
        target.write_text("x")
    elif kind == "config_list":
        peft_adapter(target, config="[1, 2]")
    elif kind == "config_not_json":
        peft_adapter(target, config="{not json")
    elif kind == "no_weights":
        peft_adapter(target)
        (target / "adapter_model.safetensors").unlink()
    check_error(run_cli("eval", str(spec_file), "--adapter", str(target)), str(target))


def test_eval_out_that_is_a_folder(spec_file, tmp_path):
    check_error(run_cli("eval", str(spec_file), "--out", str(tmp_path)), "--out", "is a folder")


@pytest.mark.parametrize(
    "config,weights,needle",
    [
        ({"peft_type": "LORA", "lora_alpha": "big"}, None, "lora_alpha"),
        ({"peft_type": "LORA", "lora_alpha": 4, "alpha_pattern": ["x"]}, None, "alpha_pattern"),
        ("[]", None, "JSON object"),
        (None, b"\xff" * 64, "safetensors"),
    ],
)
def test_convert_malformed_adapter(tmp_path, config, weights, needle):
    src = peft_adapter(tmp_path / "src", config, weights)
    check_error(run_cli("convert", "--to", "mlx", str(src), str(tmp_path / "out")), needle)


def test_convert_out_that_is_a_file_or_a_foreign_folder(tmp_path):
    src = peft_adapter(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    check_error(run_cli("convert", "--to", "mlx", str(src), str(tmp_path / "file")), "OUT", "is a file")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    check_error(run_cli("convert", "--to", "mlx", str(src), str(foreign)), "OUT", "other contents")
    assert (foreign / "holiday.jpg").read_text() == "x"


def finished_run(root: Path, data_dir: Path) -> Path:
    """A run folder with spec.yaml and one finished (manifested) adapter, as `train` leaves it."""
    from mindprint_ray.runs.run_folder import ADAPTER_MANIFEST

    spec = make_spec(root.parent / "spec-src.yaml", data_dir)
    root.mkdir(parents=True)
    (root / "spec.yaml").write_text(spec.read_text())
    adapter = peft_adapter(root / "adapters" / "alpha")
    (adapter / ADAPTER_MANIFEST).write_text("{}")
    return root


def test_export_refuses_to_overwrite_what_it_did_not_write(tmp_path, data_dir):
    run = finished_run(tmp_path / "run", data_dir)
    (tmp_path / "file").write_text("x")
    check_error(run_cli("export", str(run), "--topic", "alpha", "--out", str(tmp_path / "file")), "--out", "is a file")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    check_error(run_cli("export", str(run), "--topic", "alpha", "--out", str(home)), "--out", "other contents")
    assert (home / "thesis.tex").read_text() == "years of work"
    check_error(
        run_cli("export", str(run), "--topic", "alpha", "--out", str(run / "adapters" / "alpha")),
        "--out",
        "adapter folder itself",
    )
    check_error(run_cli("export", str(run), "--topic", "../adapters/alpha"), "--topic")
    ok = run_cli("export", str(run), "--topic", "alpha", "--out", str(tmp_path / "exported"))
    assert ok.returncode == 0, ok.stderr
    again = run_cli("export", str(run), "--topic", "alpha", "--out", str(tmp_path / "exported"))
    assert again.returncode == 0, again.stderr  # an earlier export may be replaced


def test_report_out_that_is_a_file_and_a_price_that_is_not_a_number(spec_file, tmp_path):
    (tmp_path / "file").write_text("x")
    check_error(run_cli("report", str(spec_file), "--out", str(tmp_path / "file")), "--out", "is a file")
    check_error(
        run_cli("report", str(spec_file), "--out", str(tmp_path / "r"), "--price-per-hour", "inf"),
        "--price-per-hour",
        "finite",
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan"], "Missing argument"),
        (["plan", "{spec}", "--bogus"], "No such option"),
        (["report", "{spec}", "--price-per-hour", "-1"], "--price-per-hour"),
        (["report", "{spec}", "--price-per-hour", "nan"], "--price-per-hour"),
        (["generate", "{spec}", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(spec_file, args, needle):
    r = run_cli(*[a.format(spec=spec_file) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert needle in r.stderr, r.stderr


def test_spec_that_is_a_folder_or_too_large(tmp_path):
    check_error(run_cli("validate", str(tmp_path)), str(tmp_path), "is a folder")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (17 * 1024 * 1024) + "\n")
    check_error(run_cli("validate", str(big)), str(big), "larger than")


def test_run_folder_files_changed_by_hand(tmp_path, data_dir):
    run = finished_run(tmp_path / "run", data_dir)
    (run / "summary.json").write_text('{"topics": ')
    check_error(run_cli("calibrate", str(run)), str(run / "summary.json"))
    (run / "summary.json").write_text('{"topics": {}}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    check_error(run_cli("calibrate", str(run)), f"{run / 'metrics.jsonl'}:2:", "JSON object")


def test_calibration_file_that_is_not_utf8(spec_file, tmp_path):
    cal = tmp_path / "calibration.json"
    cal.write_bytes(b"\xff\xfe{}")
    check_error(run_cli("plan", str(spec_file), env={"MINDPRINT_CALIBRATION": str(cal)}), str(cal), "calibration")


@pytest.mark.parametrize("command", ["tiny-model", "sample-model"])
def test_model_folder_target_that_is_a_file(tmp_path, command):
    target = tmp_path / "model"
    target.write_text("x")
    check_error(run_cli(command, str(target)), str(target), "DIR", "is a file")
    assert target.read_text() == "x"
