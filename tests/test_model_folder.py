"""A model folder that is not the architecture the spec names is refused before Ray starts."""

from conftest import make_data, make_spec, run_cli


def test_model_folder_of_another_architecture_is_refused_before_ray(tmp_path, smollm2_dir):
    data = make_data(tmp_path / "data")
    spec = make_spec(tmp_path / "run.yaml", data, storage={"path": str(tmp_path / "runs")})
    result = run_cli("train", str(spec), f"model.path={smollm2_dir}", "model.name=tiny", timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config.json" in result.stderr and "num_hidden_layers is 30, but tiny has 8" in result.stderr
    assert not (tmp_path / "runs" / "t").exists()
