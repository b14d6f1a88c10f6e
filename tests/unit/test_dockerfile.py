"""The operator image's Dockerfile: what can be checked without building it.

No image is built here; these tests read the Dockerfile and hold it to the chart and to
pyproject.toml: the command it runs exists, the user is non-root and numeric, and only the
package goes in.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    (value,) = [rest for k, rest in stage if k == keyword]
    parsed = json.loads(value)  # the exec form: no shell between the signal and the operator
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def test_default_command_is_the_operator_console_script() -> None:
    stage = final_stage()
    command = exec_form(stage, "ENTRYPOINT") + exec_form(stage, "CMD")
    assert command == ["mpu-janitor", "operator"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["scripts"][command[0]]
    module, _, function = target.partition(":")
    source = ROOT / "operator" / Path(*module.split(".")).with_suffix(".py")
    assert source.is_file(), f"{target}: {source} is missing"
    assert re.search(rf"^def {function}\(", source.read_text(), re.M), target


def test_runs_as_a_numeric_non_root_user_that_the_chart_expects() -> None:
    stage = final_stage()
    (user,) = [rest for keyword, rest in stage if keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user} must be numeric and non-root"
    assert gid == "" or (gid.isdigit() and int(gid) > 0)
    values = yaml.safe_load((ROOT / "charts" / "mpu-janitor" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    # USER is the last say on the user: nothing after it switches back.
    assert [k for k, _ in stage].index("USER") > max(
        i for i, (k, _) in enumerate(stage) if k == "RUN"
    )


def build_args() -> dict[str, str]:
    """The ARG defaults declared before the first FROM (usable in FROM lines)."""
    found = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def test_slim_python_base_named_once() -> None:
    """Both stages build FROM one ARG, so pinning the base (a digest) is a one-line change."""
    bases = [rest.split()[0] for keyword, rest in instructions() if keyword == "FROM"]
    assert bases == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    image = build_args()["PYTHON_IMAGE"]
    assert image.startswith("python:3.11-slim")
    _, _, digest = image.partition("@")
    assert digest == "" or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image


def test_the_pin_script_pins_the_base_by_digest(tmp_path: Path) -> None:
    """scripts/pin-base-image.sh writes the digest of the tag into the Dockerfile's ARG (here
    given the digest, as no registry is reachable from the tests)."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text((ROOT / "Dockerfile").read_text())
    digest = "sha256:" + "0123456789abcdef" * 4
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pin-base-image.sh"), "--digest", digest,
         "--dockerfile", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pinned = dockerfile.read_text()
    expected = re.sub(
        r"^ARG PYTHON_IMAGE=.*$",
        f"ARG PYTHON_IMAGE=python:3.11-slim@{digest}",
        (ROOT / "Dockerfile").read_text(),
        flags=re.M,
    )
    assert pinned == expected
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pin-base-image.sh"), "--digest", "sha256:nope",
         "--dockerfile", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "sha256:nope" in bad.stderr


def test_oci_labels() -> None:
    """The image says what it is, where its source is, its version and licence."""
    stage = final_stage()
    labels: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "LABEL":
            for key, value in re.findall(r'(\S+?)="([^"]*)"', rest):
                labels[key] = value
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((ROOT / "charts" / "mpu-janitor" / "Chart.yaml").read_text())
    prefix = "org.opencontainers.image."
    assert labels[prefix + "title"] == "mpu-janitor"
    assert labels[prefix + "source"] == chart["sources"][0]
    assert labels[prefix + "licenses"] == project["license"]["text"]
    assert labels[prefix + "description"]
    for name, arg in (("version", "VERSION"), ("revision", "REVISION"), ("created", "CREATED")):
        assert labels[prefix + name] == "${" + arg + "}"
    declared = {rest.partition("=")[0]: rest.partition("=")[2] for k, rest in stage if k == "ARG"}
    assert declared["VERSION"] == project["version"] == chart["appVersion"]
    assert {"REVISION", "CREATED"} <= set(declared)


def test_installs_the_package_and_nothing_else() -> None:
    copied = [rest for keyword, rest in instructions() if keyword == "COPY"]
    sources = {
        part for line in copied if not line.startswith("--from") for part in line.split()[:-1]
    }
    # The package's sources, and the lock as constraints for its dependencies.
    assert sources == {"pyproject.toml", "README.md", "operator/", "requirements/test.txt"}
    installs = [rest for keyword, rest in final_stage() if keyword == "RUN" and "pip" in rest]
    assert len(installs) == 1
    assert "--constraint /tmp/constraints.txt /wheels/*.whl" in installs[0]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*")] == "*"  # everything is excluded, then allowed back
    allowed = {line[1:] for line in ignored if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator/", "requirements/test.txt"}


def test_exposes_the_metrics_port_of_the_chart() -> None:
    (port,) = [rest for keyword, rest in final_stage() if keyword == "EXPOSE"]
    values = yaml.safe_load((ROOT / "charts" / "mpu-janitor" / "values.yaml").read_text())
    assert int(port) == values["operator"]["metricsPort"]
