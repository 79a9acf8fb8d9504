"""README's set-up commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_commands():
  text = (ROOT / "README.md").read_text()
  section = text.split("## Set up (fresh machine)", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands():
  install_and_run, test = _setup_commands()
  assert 'pip install -e ".[test]"' in install_and_run
  assert test.startswith("python -m pytest")


def test_ci_installs_and_tests_as_readme_says():
  install_and_run, test = _setup_commands()
  ci = (ROOT / ".ci" / "run").read_text()
  assert 'python -m pip install -q -e ".[test]"' in ci
  assert "python -m venv" in ci or "python3 -m venv" in ci
  assert f"\n{test}\n" in ci, f"CI must run README's test command {test!r}"
  assert "exit 1" in ci and '"$rc" -eq 5' in ci   # "no tests" fails CI


def test_every_module_the_readme_runs_exists():
  """A renamed module must not leave a dead ``python -m`` command in the README."""
  import importlib.util
  import re
  modules = set(re.findall(r"python -m ([A-Za-z_][\w.]*)", (ROOT / "README.md").read_text()))
  assert {"experiments.run", "experiments.compare", "experiments.reproduce"} <= modules
  missing = [m for m in sorted(modules)
             if m not in ("pytest", "venv", "pip") and importlib.util.find_spec(m) is None]
  assert not missing, f"README runs modules that do not exist: {missing}"
