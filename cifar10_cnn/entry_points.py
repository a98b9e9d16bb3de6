"""Every entry point's arguments, declared once: the steps' argparse, both MLproject files and the docs table.

The hyperparameters come from `recipes.TrainConfig` (each field declares its default, check and help);
the other step arguments are `OPTIONS` below; `ENTRY_POINTS` says which arguments each step takes.
`MLproject`, `deploy/kubernetes/MLproject` and the parameter table of docs/pipeline.md are generated
from these:

    python -m cifar10_cnn.entry_points           # rewrite the three files
    python -m cifar10_cnn.entry_points --check   # exit 1 naming each file that differs (the tests do this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import constants as C
from . import recipes

# name -> (default, or None when the argument is required; help)
OPTIONS: dict[str, tuple[str | None, str]] = {
    "recipe": ("seed", "seed (the tutorial), fast (AirNet, the speed-runs' recipe) or fast94 (the same, wider "
                       "network)"),
    "device": ("auto", "auto (CUDA, then MPS, then the CPU), cpu, cuda or mps"),
    "nproc_per_node": ("1", "training processes on this machine (torchrun + DDP; gloo on CPU, NCCL on CUDA)"),
    "resume_run_id": ("none", "a killed train run to continue from its last epoch"),
    "tta": ("auto", "test-time augmentation in evaluate: false, flip, crops, or auto (the recipe's)"),
    "data": ("auto", "auto, a URL, a .tar.gz archive or an extracted folder"),
    "expected_records": ("50000,10000", "TRAIN,TEST record counts the archive must hold, or 'any'"),
    "model_name": (C.DEFAULT_MODEL_NAME, "registered name of the PyTorch flavor; ONNX gets '-onnx', INT8 '-onnx-int8'"),
    "int8": ("true", "also quantize to INT8 (registered if it loses <= 1 point)"),
    "reuse": ("true", "reuse FINISHED step runs with the same parameters, code (git commit) and data"),
    "version": ("candidate", "a registered version number or an alias (candidate, previous)"),
    "force": ("false", "promote even when the test accuracy is lower"),
    "ingest_run_id": (None, "the FINISHED ingest run whose data to use"),
    "train_run_id": (None, "the FINISHED train run whose model to use"),
    "evaluate_run_id": (None, "the FINISHED evaluate run of that train run"),
    "model_uri": (f"models:/{C.DEFAULT_MODEL_NAME}{C.ONNX_REGISTERED_SUFFIX}@{C.CANDIDATE_ALIAS}",
                  "the model to score with: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/<id>/<name>"),
    "images": (None, "a folder (or file) of images, or a CIFAR-10 archive or folder (its test images, scored)"),
    # tune's own
    "trials": ("20", "trials in all (every worker together)"),
    "budget_minutes": ("60", "wall-clock minutes for the whole tune: no trial starts that would not leave room "
                             "for it and for training the winner"),
    "space": ("auto", "what to search: name=low:high[:log] or name=a|b|c, comma-separated (auto: the recipe's)"),
    "study": ("auto", "the study's name: the same name resumes it or joins it (auto: <recipe>-<date-time>)"),
    "workers": ("1", "trial processes at once on this machine (more machines: the same command, one store)"),
    "validation": ("5000", "training images held out to score the trials (a tenth of them per class)"),
    "search_seed": ("42", "seed of the sampler (TPE); each worker's is derived from it"),
}
HYPERPARAMETERS = "<every hyperparameter>"  # in ENTRY_POINTS: recipes.FIELDS, each 'auto' by default
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "main": (HYPERPARAMETERS, "recipe", "device", "nproc_per_node", "resume_run_id", "tta", "data",
             "expected_records", "model_name", "int8", "reuse"),
    "ingest": ("data", "expected_records"),
    "train": ("ingest_run_id", HYPERPARAMETERS, "recipe", "device", "nproc_per_node", "resume_run_id"),
    "evaluate": ("train_run_id", "device", "tta"),
    "export": ("train_run_id", "evaluate_run_id", "model_name", "int8"),
    "predict": ("model_uri", "images"),
    "promote": ("version", "model_name", "force"),
    "tune": ("recipe", "trials", "budget_minutes", "space", "study", "workers", "validation", "search_seed", "data",
             "expected_records", "device", "model_name", "int8", "reuse"),
}
KUBERNETES_ENTRY_POINTS = ("main",)


def arguments(entry_point: str) -> list[str]:
    """The entry point's argument names, hyperparameters spelled out."""
    return [n for name in ENTRY_POINTS[entry_point] for n in (recipes.FIELDS if name == HYPERPARAMETERS else (name,))]


def default_and_help(name: str, entry_point: str = "main") -> tuple[str | None, str]:
    """An argument's default and help: a hyperparameter's declaration where the entry point takes them all
    (tune's budget_minutes is its own option, not the training's)."""
    if name in recipes.SPECS and HYPERPARAMETERS in ENTRY_POINTS[entry_point]:
        spec = recipes.SPECS[name]
        unit = f" ({spec['unit']})" if spec["unit"] else ""
        return recipes.AUTO, f"{spec['check'].describe()}{unit}: {spec['help']}"
    return OPTIONS[name]


def parser(entry_point: str, description: str | None = None) -> argparse.ArgumentParser:
    """argparse for `python -m steps.<entry_point>`: every argument as a string, checked by the step."""
    parse = argparse.ArgumentParser(prog=f"python -m steps.{entry_point}", description=description)
    for name in arguments(entry_point):
        default, help_text = default_and_help(name, entry_point)
        if name in recipes.SPECS and HYPERPARAMETERS in ENTRY_POINTS[entry_point]:
            help_text = f"'auto' (the recipe's) or {help_text}"
        parse.add_argument(f"--{name.replace('_', '-')}", default=default, required=default is None,
                           help=help_text.replace("%", "%%"))
    return parse


# --- the generated files --------------------------------------------------------------------------

HEADER = """\
# GENERATED by `python -m cifar10_cnn.entry_points` from cifar10_cnn/recipes.py (each hyperparameter) and
# cifar10_cnn/entry_points.py (the other step arguments): edit those and regenerate, never this file;
# tests/test_project_files.py fails when the two differ. MLflow passes every value as a string and does
# not check the declared type, so each step checks its own arguments before it does any work.
"""


def _parameter(name: str, indent: str, entry_point: str = "main") -> str:
    default, help_text = default_and_help(name, entry_point)
    spec = "{type: string}" if default is None else f'{{type: string, default: "{default}"}}'
    return f"{indent}{name}: {spec}  # {help_text}"


def _command(entry_point: str, indent: str) -> str:
    lines = [f"python -m steps.{entry_point}"]
    for name in arguments(entry_point):  # an option and its value never split across lines
        option = f"--{name.replace('_', '-')} {{{name}}}"
        lines[-1:] = [f"{lines[-1]} {option}"] if len(lines[-1]) + len(option) < 110 else [lines[-1], option]
    return f"{indent}command: >-\n" + "\n".join(f"{indent}  {line}" for line in lines)


def _entry_points(names: tuple[str, ...]) -> list[str]:
    out = ["entry_points:"]
    for entry_point in names:
        out += [f"  {entry_point}:", "    parameters:"]
        if HYPERPARAMETERS in ENTRY_POINTS[entry_point]:
            out.append("      <<: *hyperparameters")
        out += [_parameter(n, "      ", entry_point) for n in ENTRY_POINTS[entry_point] if n != HYPERPARAMETERS]
        out += [_command(entry_point, "    "), ""]
    return out


def _hyperparameters() -> list[str]:
    return ["# Each hyperparameter is 'auto' (the recipe's value) or a value that overrides the recipe.",
            "x-hyperparameters: &hyperparameters", *(_parameter(n, "  ") for n in recipes.FIELDS), ""]


def mlproject() -> str:
    return "\n".join([HEADER + "name: cifar10-cnn", "", "python_env: python_env.yaml", "", *_hyperparameters(),
                      *_entry_points(tuple(ENTRY_POINTS))]).rstrip() + "\n"


def kubernetes_mlproject() -> str:
    about = ("# The recipe for `mlflow run deploy/kubernetes --backend kubernetes --backend-config\n"
             "# deploy/kubernetes/kubernetes_config.json`: MLflow's Kubernetes backend needs a docker_env project,\n"
             "# so this one runs the image built from deploy/Dockerfile; inside the pod `main` runs the four steps\n"
             "# with the image's Python, with the same parameters as ./MLproject.\n")
    return "\n".join([HEADER + about + "name: cifar10-cnn-kubernetes", "", "docker_env:", "  image: cifar10-cnn:latest",
                      "", *_hyperparameters(), *_entry_points(KUBERNETES_ENTRY_POINTS)]).rstrip() + "\n"


DOCS_BEGIN = "<!-- BEGIN parameters: generated by `python -m cifar10_cnn.entry_points`; edit cifar10_cnn/ -->"
DOCS_END = "<!-- END parameters -->"


def docs_table() -> str:
    rows = ["| parameter | default | accepts, and what it does |", "|---|---|---|"]
    for name in arguments("main"):
        default, help_text = default_and_help(name)
        if name in recipes.SPECS:
            values = {r: getattr(c, name) for r, c in recipes.RECIPES.items()}
            default = "auto (" + ", ".join(f"{r}: {_shown(v)}" for r, v in values.items()) + ")"
        rows.append(f"| `{name}` | {default} | {help_text.replace('|', ' or ')} |")
    return "\n".join(rows)


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).lower()


def with_docs_table(page: str) -> str:
    """`page` with the text between its two markers replaced by the current table."""
    start, end = page.index(DOCS_BEGIN) + len(DOCS_BEGIN), page.index(DOCS_END)
    return page[:start] + "\n" + docs_table() + "\n" + page[end:]


def generated(project_dir: Path) -> dict[Path, str]:
    """Each generated file of the project and the text it must hold."""
    docs = project_dir / "docs" / "pipeline.md"
    return {project_dir / "MLproject": mlproject(),
            project_dir / "deploy" / "kubernetes" / "MLproject": kubernetes_mlproject(),
            docs: with_docs_table(docs.read_text())}


def main(argv=None) -> int:
    parse = argparse.ArgumentParser(prog="python -m cifar10_cnn.entry_points", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file differs")
    parse.add_argument("--project", default=str(Path(__file__).resolve().parents[1]), help="the checkout")
    args = parse.parse_args(argv)
    files = generated(Path(args.project))
    stale = [path for path, text in files.items() if path.read_text() != text]
    for path in stale:
        if args.check:
            print(f"{path} differs from what cifar10_cnn declares; run python -m cifar10_cnn.entry_points",
                  file=sys.stderr)
        else:
            path.write_text(files[path])
            print(f"wrote {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
