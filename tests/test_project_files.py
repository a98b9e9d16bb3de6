"""The MLproject, the environment files and the step scripts must agree with each other."""

import importlib
import json
import re
import shlex
import tomllib

import pytest
import yaml

from tests.conftest import PROJECT_DIR

MLPROJECT = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())


def test_environment_files_list_the_same_dependencies():
    pyproject = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    python_env = yaml.safe_load((PROJECT_DIR / "python_env.yaml").read_text())["dependencies"]
    conda = yaml.safe_load((PROJECT_DIR / "conda.yaml").read_text())["dependencies"]
    conda_pip = next(d["pip"] for d in conda if isinstance(d, dict))
    assert sorted(pyproject) == sorted(python_env) == sorted(conda_pip)


def test_mlproject_points_at_python_env():
    assert MLPROJECT["python_env"] == "python_env.yaml"
    assert set(MLPROJECT["entry_points"]) == {"main", "ingest", "train", "evaluate", "export", "promote", "predict",
                                              "tune"}


@pytest.mark.parametrize("entry", sorted(MLPROJECT["entry_points"]))
def test_each_command_parses_with_its_step_script(entry, monkeypatch):
    spec = MLPROJECT["entry_points"][entry]
    values = {}
    for name, p in spec["parameters"].items():
        default = p.get("default") if isinstance(p, dict) else None
        values[name] = str(default) if default is not None else "0" * 32  # run ids have no default
    argv = shlex.split(spec["command"].format(**{k: shlex.quote(v) for k, v in values.items()}))  # as MLflow does
    assert argv[:3] == ["python", "-m", f"steps.{entry}"]
    module = importlib.import_module(f"steps.{entry}")
    seen = {}

    def fake_run_step(step, body, system_metrics=False, **kwargs):
        seen.update(kwargs, step=step)

    monkeypatch.setattr(module.tracking, "run_step", fake_run_step)
    module.main(argv[3:])
    assert seen.pop("step") == entry
    assert seen == values  # every MLproject parameter reaches the step under its own name
    # ... and the step, called with only the required ones, defaults the others as MLproject does
    seen.clear()
    required = [a for k, v in values.items() if v == "0" * 32 for a in (f"--{k.replace('_', '-')}", v)]
    module.main(required)
    seen.pop("step")
    assert seen == values


def test_generated_files_match_the_declarations(tmp_path):
    """MLproject, deploy/kubernetes/MLproject and the docs' parameter table are made from cifar10_cnn's
    declarations; a hand edit (or a new hyperparameter without regenerating) is caught here."""
    from cifar10_cnn import entry_points

    stale = [str(path.relative_to(PROJECT_DIR)) for path, text in entry_points.generated(PROJECT_DIR).items()
             if path.read_text() != text]
    assert stale == [], f"regenerate with: python -m cifar10_cnn.entry_points ({stale})"
    # ... and the check sees an edit: a copy of the project with one default changed by hand
    for name in ("MLproject", "deploy/kubernetes/MLproject", "docs/pipeline.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((PROJECT_DIR / name).read_text())
    assert entry_points.main(["--check", "--project", str(tmp_path)]) == 0
    edited = (tmp_path / "MLproject").read_text().replace('nproc_per_node: {type: string, default: "1"}',
                                                           'nproc_per_node: {type: string, default: "2"}', 1)
    (tmp_path / "MLproject").write_text(edited)
    assert entry_points.main(["--check", "--project", str(tmp_path)]) == 1
    k8s = yaml.safe_load((PROJECT_DIR / "deploy/kubernetes/MLproject").read_text())
    assert k8s["docker_env"]["image"] == "cifar10-cnn:latest"
    assert k8s["entry_points"]["main"] == MLPROJECT["entry_points"]["main"]


def test_kubernetes_backend_files_parse_and_point_at_each_other():
    config = json.loads((PROJECT_DIR / "deploy/kubernetes/kubernetes_config.json").read_text())
    assert set(config) == {"kube-context", "repository-uri", "kube-job-template-path"}
    template = yaml.safe_load((PROJECT_DIR / config["kube-job-template-path"]).read_text())
    assert template["kind"] == "Job"
    (container,) = template["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["{replaced with MLflow Project entry point command}"]
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in container["env"])


def test_image_installs_the_project_and_compose_serves_artifacts_from_postgresql():
    dockerfile = (PROJECT_DIR / "deploy/Dockerfile").read_text()
    for line in ("COPY cifar10_cnn ./cifar10_cnn", "COPY steps ./steps", "ENV PYTHONPATH=/opt/cifar10-cnn",
                 "COPY MLproject python_env.yaml conda.yaml ./"):
        assert line in dockerfile
    compose = yaml.safe_load((PROJECT_DIR / "deploy/compose.yaml").read_text())
    server = compose["services"]["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in server and "--serve-artifacts" in server
    assert "--serve-artifacts" in (PROJECT_DIR / ".ci/team_server.sh").read_text()


def test_readme_is_short_and_its_links_lead_somewhere():
    readme = (PROJECT_DIR / "README.md").read_text()
    assert len(readme.splitlines()) <= 150  # the reference lives in docs/
    links = re.findall(r"\]\(((?!https?://)[^)#]+)", readme)
    assert {"docs/pipeline.md", "docs/reliability.md", "docs/performance.md"} <= set(links)
    for link in links:
        assert (PROJECT_DIR / link).is_file(), link
    for page in (PROJECT_DIR / "docs").glob("*.md"):  # and the docs' links to each other
        for link in re.findall(r"\]\(((?!https?://)[^)#]+)", page.read_text()):
            assert (page.parent / link).is_file() or (PROJECT_DIR / link).is_file(), f"{page.name}: {link}"


def test_library_modules_are_small_listed_and_import_only_the_ones_listed_above_them():
    """docs/pipeline.md's layout lists every module of cifar10_cnn/ in layers; a module imports (at the
    top or inside a function) only modules listed before it, so there is no cycle, and none is long."""
    import ast

    layout = (PROJECT_DIR / "docs/pipeline.md").read_text().split("cifar10_cnn/         the library")[1]
    order = []
    for line in layout.split("\ndocs/")[0].splitlines()[1:]:  # "  muon, optimizers     what they do"
        order += [name.strip() for name in re.match(r"\s+([a-z_0-9, ]+?)\s{2,}", line + "  ").group(1).split(",")]
    modules = {p.stem: p for p in (PROJECT_DIR / "cifar10_cnn").glob("*.py") if not p.stem.startswith("__")}
    assert sorted(order) == sorted(modules), "docs/pipeline.md's layout must list every module once"
    for name, path in modules.items():
        text = path.read_text()
        assert len(text.splitlines()) <= 300, f"{name}.py has {len(text.splitlines())} lines"
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar10_cnn"):
                imported |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        higher = {m for m in imported if m in modules and order.index(m) >= order.index(name)}
        assert not higher, f"{name} imports {sorted(higher)}, listed at or after it"
